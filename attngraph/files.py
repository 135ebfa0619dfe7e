"""Directories that attngraph writes: one writer at a time, nothing half-written, no writes through links.

- ``DirectoryLock(path)``: the directory belongs to this process while the lock is held (``flock`` on
  ``path/.attngraph.lock``, released by the kernel when the process ends, killed or not, so a lock is never
  stale); a second writer fails at once with ``DirectoryBusy``, naming the holder's pid.  The lock file stays:
  it also marks the directory as attngraph's, so a directory holding only it (and temporaries) is empty.
- ``write_file(dir, name, data)``: ``data`` goes to a new temporary file beside ``name`` (created exclusively,
  so it never follows a link), is flushed to the disk, and is renamed over ``name`` (a rename replaces a link
  there; it never writes into the file the link points to).  A reader sees the old file or the new one.
- ``write_file_by(dir, name, make)``: the same for a file that ``make(path)`` writes by its path.
- ``new_temp_dir`` / ``commit_dir``: a directory written in full under a temporary name, then renamed into
  place: the way a unit of several files (a checkpoint) appears at once.
- ``remove_temporaries``: what a killed writer left (``.NAME.tmp-PID-...``), cleaned by the next holder of the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil

LOCK = ".attngraph.lock"
_TMP = ".tmp-"


class DirectoryBusy(RuntimeError):
    """Another process is writing the directory."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryLock:
    """Holds ``path`` (created if missing) for this process: ``with DirectoryLock(path, "training"):``."""

    def __init__(self, path: str, what: str = "writing"):
        self.path, self.what, self._fd = path, what, None
        os.makedirs(path, exist_ok=True)
        #: whether this lock made the lock file (the mark of an attngraph directory) rather than found it
        self.marked = not os.path.lexists(os.path.join(path, LOCK))
        fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DirectoryBusy(f"{path} is in use: another attngraph process ({holder or 'pid unknown'}) is "
                                f"writing it; wait for it to finish or give another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {what}\n".encode())
        self._fd = fd

    def release(self, unmark: bool = False) -> None:
        """Release the directory; ``unmark``: also remove the lock file if this lock made it, so that a directory
        attngraph refused to write (a user's) is left without the mark that says it is attngraph's."""
        if self._fd is not None:
            if unmark and self.marked:
                os.unlink(os.path.join(self.path, LOCK))
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_name(name: str) -> str:
    return f".{name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary that ``write_file`` or ``new_temp_dir`` makes."""
    return name.startswith(".") and _TMP in name


def ours(name: str) -> bool:
    """Files of attngraph's own that do not make a directory non-empty: its lock and temporaries."""
    return name == LOCK or is_temporary(name)


def write_file(directory: str, name: str, data: bytes) -> None:
    """Write ``data`` as ``directory/name`` whole or not at all (see the module's docstring)."""
    tmp = os.path.join(directory, _temp_name(name))
    with open(tmp, "xb") as f:  # O_EXCL: a link planted at the temporary's name is an error, not followed
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)


def write_file_by(directory: str, name: str, make) -> None:
    """As ``write_file``, for a file that ``make(path)`` writes by its path (one too large to hold in memory, or
    written by a library): made in a new temporary directory beside ``name``, flushed, renamed over it."""
    tmp = new_temp_dir(directory, name)
    try:
        path = os.path.join(tmp, name)
        make(path)
        os.chmod(path, 0o666 & ~_umask())  # as a file opened here would be (a library may write its own 0600)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, os.path.join(directory, name))
        _fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_temp_dir(directory: str, name: str) -> str:
    """A new, empty directory in ``directory`` to be renamed to ``name`` by ``commit_dir`` when complete."""
    path = os.path.join(directory, _temp_name(name))
    os.mkdir(path)
    return path


def write_new(directory: str, name: str, data: bytes) -> None:
    """A new file ``directory/name`` (in a directory that is not visible yet), flushed to the disk."""
    with open(os.path.join(directory, name), "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def commit_dir(temp: str, final: str) -> None:
    """Make the complete directory ``temp`` appear as ``final`` (which must not exist) in one step."""
    _fsync_dir(temp)
    os.rename(temp, final)
    _fsync_dir(os.path.dirname(final) or ".")


def our_json(path: str, keys) -> dict | None:
    """The JSON object in ``path`` if it is one of ours (a regular file, not a link, whose object has ``keys``), else
    None: a user's file that only shares its name (``manifest.json``, ``generate.json``) is not taken for ours."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and set(keys) <= set(obj) else None


def foreign(directory: str) -> list[str]:
    """The names in ``directory`` that are not attngraph's own lock and temporaries, sorted."""
    return sorted(n for n in os.listdir(directory) if not ours(n))


def listing(names, most: int = 5) -> str:
    """``names`` for a message: the first ``most``, then how many more."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def remove_temporaries(directory: str) -> list[str]:
    """Remove what killed writers left in ``directory`` (call it holding the lock); returns their names."""
    gone = []
    for name in os.listdir(directory):
        if is_temporary(name):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            gone.append(name)
    return gone


__all__ = ["DirectoryBusy", "DirectoryLock", "LOCK", "commit_dir", "foreign", "is_temporary", "listing", "new_temp_dir",
           "our_json", "ours",
           "remove_temporaries", "write_file", "write_file_by", "write_new"]
