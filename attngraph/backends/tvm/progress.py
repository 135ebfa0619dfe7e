"""A progress display for builds that take more than a moment.

Nothing is drawn for the first ``delay`` seconds, so a cached or tiny build stays silent; after
that (a timer fires even in the middle of one long step, such as LLVM compiling) a rich progress
bar on stderr shows the current stage.  Off when stderr is not a terminal (tests, logs, pipes)."""

from __future__ import annotations

import sys
import threading
from typing import Self


class Progress:
    """``with Progress() as p: p.stage("lowering", total=n); p.advance(); ...``"""

    def __init__(self, enabled: bool | None = None, delay: float = 0.5):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.delay = delay
        self._bar = None
        self._task = None
        self._timer = None
        self._lock = threading.Lock()
        self._label, self._total, self._done = "", None, 0

    def __enter__(self) -> Self:
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
            self.enabled = False  # a late timer must not draw after the work is done

    def stage(self, label: str, total: int | None = None) -> None:
        """Start a new stage (``total`` steps, or None for one step of unknown length)."""
        with self._lock:
            self._label, self._total, self._done = label, total, 0
            if self._bar is not None:
                self._bar.remove_task(self._task)
                self._task = self._bar.add_task(label, total=total)

    def advance(self, steps: int = 1) -> None:
        with self._lock:
            self._done += steps
            if self._bar is not None:
                self._bar.update(self._task, completed=self._done)

    def _show(self) -> None:
        from rich import progress as rp
        from rich.console import Console
        with self._lock:
            if not self.enabled or self._bar is not None:
                return
            self._bar = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                                    console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=self._total, completed=self._done)
