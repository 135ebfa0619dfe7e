"""A progress display for builds that take more than a moment.

Nothing is drawn for the first ``delay`` seconds, so a cached or tiny build stays silent; after
that a rich progress bar on stderr shows the current stage.  Off when stderr is not a terminal
(tests, logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Self


class Progress:
    """``with Progress() as p: p.stage("lowering", total=n); p.advance(); ...``"""

    def __init__(self, enabled: bool | None = None, delay: float = 0.5):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.delay = delay
        self._start = time.perf_counter()
        self._bar = None
        self._task = None
        self._label, self._total, self._done = "", None, 0

    def __enter__(self) -> Self:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def stage(self, label: str, total: int | None = None) -> None:
        """Start a new stage (``total`` steps, or None for one step of unknown length)."""
        self._label, self._total, self._done = label, total, 0
        self._refresh(new_stage=True)

    def advance(self, steps: int = 1) -> None:
        self._done += steps
        self._refresh()

    def _refresh(self, new_stage: bool = False) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.perf_counter() - self._start < self.delay:
                return
            from rich import progress as rp
            from rich.console import Console
            self._bar = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                                    console=Console(stderr=True), transient=True)
            self._bar.start()
            new_stage = True
        if new_stage:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(self._label, total=self._total)
        self._bar.update(self._task, completed=self._done)
