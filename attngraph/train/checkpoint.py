"""A training run's directory and its checkpoints: saved whole or not at all, read back only whole.

    DIR/.attngraph.lock           held by the run training into DIR (``files.DirectoryLock``)
    DIR/checkpoint-450/           the newest complete checkpoint (the one before it is removed once this one is in place)
        config.json               the run's settings (``RunConfig``)
        tokenizer.json            the vocabulary
        params.safetensors        the parameters
        optimizer.safetensors     the optimizer's slots and the step count
        log.jsonl                 every report line of the run up to this step
        checkpoint.json           written last: the step, each file's size and sha256, the trainer's pending state

A checkpoint is written into a temporary directory, each file flushed to the disk, ``checkpoint.json`` last,
and then renamed to ``checkpoint-STEP`` in one step: a kill at any instant leaves the previous checkpoint or the
new one, never a mix.  Reading one checks every file against ``checkpoint.json`` and that the optimizer's step
is the checkpoint's, so damaged or mismatched parts are an error that names them, never a silent resume.

The sha256 sums detect damage (a truncated or flipped file, a file from another checkpoint), not tampering:
whoever can rewrite a file can rewrite ``checkpoint.json`` too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field

from .. import files

CONFIG, TOKENIZER, PARAMS, OPTIMIZER, LOG, MANIFEST = ("config.json", "tokenizer.json", "params.safetensors",
                                                       "optimizer.safetensors", "log.jsonl", "checkpoint.json")
PARTS = (CONFIG, TOKENIZER, PARAMS, OPTIMIZER, LOG)
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")

#: Fault injection for tests: ``ATTNGRAPH_CHECKPOINT_KILL=POINT@STEP`` kills the process (SIGKILL) at that point
#: of the save of that step: after the ``tempdir`` is made, after each part is written (its file name), after
#: ``checkpoint.json``, after the ``rename``, after the previous checkpoint is ``removed``.
FAULT_ENV = "ATTNGRAPH_CHECKPOINT_KILL"
POINTS = ("tempdir", *PARTS, MANIFEST, "rename", "removed")


class CheckpointError(ValueError):
    """A training directory that cannot be used as asked: the message names the directory or file."""


def _fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoints in ``run_dir`` (complete ones: only those have their final name),
    oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := _NAME.match(name)) and os.path.isdir(os.path.join(run_dir, name))]
    return sorted(found)


@dataclass
class Checkpoint:
    """One checkpoint directory; ``read(part)`` gives a part's bytes, checked against ``checkpoint.json``."""
    path: str
    step: int
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path: str) -> Checkpoint:
        where = os.path.join(path, MANIFEST)
        try:
            with open(where, "rb") as f:
                manifest = json.loads(f.read())
            step, parts = int(manifest["step"]), manifest["files"]
            if manifest.get("format") != FORMAT or not isinstance(parts, dict) or set(parts) != set(PARTS):
                raise ValueError("not a checkpoint manifest of this attngraph")
        except FileNotFoundError:
            raise CheckpointError(f"{path} is incomplete: it has no {MANIFEST}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where} is damaged ({e})") from None
        return cls(path, step, manifest)

    def read(self, part: str) -> bytes:
        where = os.path.join(self.path, part)
        try:
            if os.path.islink(where):
                raise CheckpointError(f"{where} is a symbolic link: a checkpoint holds its own files")
            with open(where, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is damaged: {part} is missing") from None
        want = self.manifest["files"][part]
        if len(data) != want.get("bytes") or _sha256(data) != want.get("sha256"):
            raise CheckpointError(f"{where} is damaged: it does not match its size and sha256 in {MANIFEST}")
        return data

    @property
    def pending(self) -> dict:
        """What the trainer keeps between reports (the losses since the last one), saved with the step."""
        return dict(self.manifest.get("pending") or {})


def latest(run_dir: str) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir``, or None when it has none."""
    found = checkpoint_dirs(run_dir)
    return Checkpoint.open(found[-1][1]) if found else None


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a training directory (it has a checkpoint) or one checkpoint of one."""
    return os.path.isdir(path) and (bool(checkpoint_dirs(path)) or os.path.isfile(os.path.join(path, MANIFEST)))


def resolve(path: str) -> Checkpoint:
    """The checkpoint ``path`` names: a training directory's newest, or a ``checkpoint-STEP`` directory itself."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return Checkpoint.open(path)
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no saved checkpoint (attngraph train writes {path}/checkpoint-STEP)")
    return found


class RunDirectory:
    """The directory a run trains into, held by this process (``files.DirectoryLock``) from before the first
    step to the end.  ``new``: the directory must be new or empty (a run killed before its first save left
    only attngraph's own files, which count as empty); otherwise it must hold a checkpoint to go on from.
    ``save`` writes a checkpoint as one unit and then removes the older ones (all but ``keep``)."""

    def __init__(self, path: str, *, new: bool, keep: int = 1):
        self.path, self.keep = path, keep
        if os.path.exists(path) and not os.path.isdir(path):
            raise CheckpointError(f"{path} is a file, not a directory")
        self.created = not os.path.exists(path)
        self.lock = files.DirectoryLock(path, "training")
        try:
            files.remove_temporaries(path)  # what a run killed in a save left
            self.checkpoint = latest(path)
            if new:
                if self.checkpoint is not None:
                    raise CheckpointError(f"{path} holds a training run (at step {self.checkpoint.step}): "
                                          f"--resume {path} goes on with it; give a new or empty directory")
                others = files.foreign(path)
                if others:
                    raise CheckpointError(f"{path} is not empty ({files.listing(others)}): give a new or empty "
                                          f"directory")
            elif self.checkpoint is None:
                raise CheckpointError(f"{path} holds no saved checkpoint to resume: the run there stopped before its "
                                      f"first save (start it again with -o {path})")
        except BaseException:
            self.close(failed=True)
            raise

    def save(self, step: int, parts: dict[str, bytes], pending: dict | None = None) -> str:
        """Write ``parts`` (every name of ``PARTS``) as ``checkpoint-STEP``; returns its path."""
        if set(parts) != set(PARTS):
            raise ValueError(f"a checkpoint has the parts {PARTS}, got {sorted(parts)}")
        saved = self.saved_at(step)
        if saved:
            return saved
        final = os.path.join(self.path, f"checkpoint-{step}")
        temp = files.new_temp_dir(self.path, os.path.basename(final))
        _fault("tempdir", step)
        for name in PARTS:
            files.write_new(temp, name, parts[name])
            _fault(name, step)
        manifest = {"format": FORMAT, "step": step, "pending": pending or {},
                    "files": {n: {"bytes": len(d), "sha256": _sha256(d)} for n, d in parts.items()}}
        files.write_new(temp, MANIFEST, json.dumps(manifest, indent=1).encode())
        _fault(MANIFEST, step)
        if os.path.lexists(final):  # a leftover of another run's numbering: never ours to keep
            shutil.rmtree(final)
        files.commit_dir(temp, final)
        _fault("rename", step)
        self.checkpoint = Checkpoint(final, step, manifest)
        for _, old in checkpoint_dirs(self.path)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        _fault("removed", step)
        return final

    def saved_at(self, step: int) -> str | None:
        """The path of the newest checkpoint if it is of ``step`` (nothing to save again), else None."""
        return self.checkpoint.path if self.checkpoint is not None and self.checkpoint.step == step else None

    def close(self, failed: bool = False) -> None:
        """Release the directory; one this run made and never saved into is removed again, and one it found is
        left as it was (without the lock file, if this run made that)."""
        if self.lock is None:
            return
        removed = failed and self.created and not files.foreign(self.path)
        if removed:
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release(unmark=failed and self.checkpoint is None and not removed)
        self.lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(failed=kind is not None and self.checkpoint is None)


__all__ = ["CONFIG", "Checkpoint", "CheckpointError", "FAULT_ENV", "LOG", "OPTIMIZER", "PARAMS", "PARTS",
           "POINTS", "RunDirectory", "TOKENIZER", "checkpoint_dirs", "is_run_dir", "latest", "resolve"]
