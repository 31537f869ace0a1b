"""One run at a time in a checkpoint directory.

Two live runs saving to one ``dirpath`` (a requeued job started while the preempted
one is still saving, a script launched twice) overwrite each other's ``last.ckpt``
and evict each other's top-k files; a resume then continues whichever wrote last.
The run's writing process holds an advisory lock on ``<dirpath>/.hooktrain.lock``
for the whole fit, and a second run fails at setup, before it trains. The file is
removed when the fit ends; a killed run leaves it, unlocked, for the next to take.

The lock is ``flock``'s: the kernel drops it when the last descriptor of the open
file goes, so a killed run (SIGKILL included) never leaves a stale lock. Forked
children (DataLoader workers, which may outlive a killed parent for a while) would
share that descriptor and keep the lock alive, so they close their copy as they
start. POSIX record locks (``lockf``) avoid that, but drop the lock when the holding
process closes *any* descriptor of the file: a helper of the same run that reads the
directory (to back it up, to upload it) would release it without a word. Where the
file system has no locks, or on Windows, nothing is checked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from hooktrain.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "DirectoryLock"]

LOCK_NAME = ".hooktrain.lock"

#: The descriptor of every directory a run of this process holds, by resolved path.
_held: dict[Path, int] = {}

_HELD_ELSEWHERE = {errno.EACCES, errno.EAGAIN}


def _close_in_child() -> None:
    # A forked child is no run of its own: without its copy, the lock ends with
    # the process that took it.
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class DirectoryLock:
    """The lock of one run on one checkpoint directory; ``acquire`` and ``release``
    pair up, and ``release`` without a held lock does nothing."""

    def __init__(self) -> None:
        self._path: Path | None = None

    def acquire(self, directory: Path) -> None:
        """Hold ``directory`` (which exists) for this run.

        :raises ConfigurationError: another live run, in this process or another
            (on this host, or on another where the file system shares locks), holds
            it; the message names its process and host as that run wrote them.
        """
        path = directory.resolve()
        if path in _held:
            raise ConfigurationError(_message(path, f"process {os.getpid()}, this one"))
        if fcntl is None:
            return
        while True:
            fd = _open(path / LOCK_NAME)
            if fd is None:
                return  # a file another user made read-only to us: nothing to check with
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno in _HELD_ELSEWHERE:
                    raise ConfigurationError(_message(path, holder or "another process")) from exc
                with contextlib.suppress(OSError):
                    os.unlink(path / LOCK_NAME)
                return  # no locks on this file system: nothing to check with
            if _still_named(fd, path / LOCK_NAME):
                break
            # The run before removed the file between our open and our lock: the
            # lock is on a file nobody else will open. Take the new one.
            os.close(fd)
        # Who holds it, for the message the next run gets; the lock is the truth.
        with contextlib.suppress(OSError):  # opened read-only: the lock still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        _held[path] = fd
        self._path = path

    def release(self) -> None:
        """Let the next run have the directory: the file goes, so that a finished
        run leaves only its checkpoints, and closing it drops the lock."""
        path, self._path = self._path, None
        if path is None or path not in _held:
            return
        with contextlib.suppress(OSError):
            os.unlink(path / LOCK_NAME)
        os.close(_held.pop(path))


def _open(path: Path) -> int | None:
    """The lock file, created readable and writable by all (a run killed under one
    user must not block a rerun under another), or read-only when an older file does
    not let us write; ``None`` when it cannot be opened at all."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None
    with contextlib.suppress(OSError):  # past the umask; fails on another's file
        os.fchmod(fd, 0o666)
    return fd


def _still_named(fd: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _message(path: Path, holder: str) -> str:
    return (
        f"hooktrain-checkpoint: another run ({holder}) is saving checkpoints to "
        f"{os.fspath(path)!r}; two runs in one directory overwrite each other's "
        f"'last' and top-k files. Wait for it to end, or give this run its own dirpath"
    )
