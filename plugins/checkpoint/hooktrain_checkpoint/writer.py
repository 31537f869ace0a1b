"""Writing off the training thread: a private copy of the state, and one writer
thread that takes one write at a time and keeps its error for the training thread."""

from __future__ import annotations

import atexit
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundWriter", "CheckpointWriteError", "snapshot"]


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint in the background failed; the cause is ``__cause__``."""


_PLAIN = (int, float, str, bool, type(None))


def snapshot(obj: Any, _memo: dict[int, Any] | None = None) -> Any:
    """A copy of a checkpoint mapping whose tensors are private CPU copies, so that
    training may go on changing the live ones while the copy is written.

    Containers are rebuilt (dicts, lists, tuples); immutable leaves are shared; a
    tensor referenced twice (tied weights) stays one tensor in the copy.
    """
    import torch

    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        copied = memo.get(id(obj))
        if copied is None:
            tensor = obj.detach()
            copied = tensor.to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.clone()
            memo[id(obj)] = copied
        return copied
    if isinstance(obj, dict):
        return type(obj)((key, snapshot(value, memo)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        # Long lists of plain numbers need no walk, item by item.
        if all(type(item) in _PLAIN for item in obj):
            return list(obj) if isinstance(obj, list) else obj
        if isinstance(obj, list):
            return [snapshot(item, memo) for item in obj]
        return tuple(snapshot(item, memo) for item in obj)
    return obj


class BackgroundWriter:
    """Runs one write at a time off the training thread and keeps its error.

    One thread lives for the whole fit and takes jobs from a queue: starting a
    thread per save cost about half a millisecond of the training thread's time.
    ``close`` (called in ``teardown``) ends it. When teardown never ran (it raised
    earlier, or the fit was abandoned), an ``atexit`` handler waits for the write
    in flight and ends the thread, so the interpreter neither abandons a
    half-written checkpoint nor waits forever for a thread nobody ends. (A
    non-daemon thread would do the first but not the second: the interpreter
    joins those before any ``atexit`` handler runs.)
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Wait for the write in flight (raising its error), then start ``job``;
        ``what`` names the files it writes, for the error message."""
        self.wait()
        self._what = what
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name="hooktrain-checkpoint-writer", daemon=True
            )
            self._thread.start()
            atexit.register(self._end_at_exit)
        self._idle.clear()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # kept and raised on the training thread
                self._error = exc
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Block until the write in flight is done.

        :raises CheckpointWriteError: when that write failed (its error is the cause).
        """
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointWriteError(
                f"writing checkpoint {self._what} failed: {type(error).__name__}: {error}"
            ) from error

    def close(self) -> None:
        """Wait for the write in flight, then end the thread.

        :raises CheckpointWriteError: when that write failed; the thread ends anyway.
        """
        thread, self._thread = self._thread, None
        try:
            self.wait()
        finally:
            if thread is not None:
                atexit.unregister(self._end_at_exit)
                self._jobs.put(None)
                thread.join()

    def _end_at_exit(self) -> None:
        try:
            self.close()
        except CheckpointWriteError as exc:
            # Nobody is left to raise it to: say it, rather than exit silently.
            print(f"hooktrain-checkpoint: {exc}", file=sys.stderr)
