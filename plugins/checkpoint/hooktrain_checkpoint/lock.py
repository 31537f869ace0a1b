"""One run at a time in a checkpoint directory.

Two live runs saving to one ``dirpath`` (a requeued job started while the preempted
one is still saving, a script launched twice) overwrite each other's ``last.ckpt``
and evict each other's top-k files; a resume then continues whichever wrote last.
The run's writing process holds an advisory lock on ``<dirpath>/.hooktrain.lock``
for the whole fit, and a second run fails at setup, before it trains. The file is
removed when the fit ends; a killed run leaves it, unlocked, for the next to take.

POSIX record locks (``fcntl.lockf``) are used rather than ``flock``: the kernel
drops them when the holder dies, SIGKILL included, so a killed run never leaves a
stale lock; and a forked child (a DataLoader worker that outlives a killed parent
for a few seconds) does not inherit them. They do not exclude a second holder in the
same process, so a set of the directories this process holds covers that case.
Where the file system has no locks (some network mounts), or on Windows, nothing is
checked.
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

#: The directories a run of this process holds, resolved.
_held: set[Path] = set()

_HELD_ELSEWHERE = {errno.EACCES, errno.EAGAIN}


class DirectoryLock:
    """The lock of one run on one checkpoint directory; ``acquire`` and ``release``
    pair up, and ``release`` without a held lock does nothing."""

    def __init__(self) -> None:
        self._fd: int | None = None
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
        while True:
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno in _HELD_ELSEWHERE:
                    raise ConfigurationError(_message(path, holder or "another process")) from exc
                return  # no locks on this file system: nothing to check with
            if _still_named(fd, path / LOCK_NAME):
                break
            # The run before removed the file between our open and our lock: the
            # lock is on a file nobody else will open. Take the new one.
            os.close(fd)
        # Who holds it, for the message the next run gets; the lock is the truth.
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd, self._path = fd, path
        _held.add(path)

    def release(self) -> None:
        """Let the next run have the directory: the file goes, so that a finished
        run leaves only its checkpoints, and closing it drops the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._path / LOCK_NAME)  # type: ignore[operator]
        os.close(self._fd)
        _held.discard(self._path)  # type: ignore[arg-type]
        self._fd = self._path = None


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
