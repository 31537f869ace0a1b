"""Writing a checkpoint: now, or off the training thread from a private copy of the
state, by one writer thread that takes one write at a time and keeps its error for
the training thread."""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hooktrain_checkpoint import sharded, storage

__all__ = [
    "BackgroundWriter",
    "CheckpointWriteError",
    "file_record",
    "snapshot",
    "write_now_or_in_background",
]


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


def file_record(checkpoint: Mapping[str, Any], sequence: int) -> dict[str, Any]:
    """The JSON record a checkpoint file carries in its zip comment, which
    `storage.read_info` reads without loading the tensors: progress, the save's
    ``sequence`` number in the directory, the local time it was made, and
    hooktrain's version."""
    progress = checkpoint["progress"]
    return {
        "epoch": int(progress["epoch"]),
        "global_step": int(progress["global_step"]),
        "epoch_batches_done": int(progress["epoch_batches_done"]),
        "epoch_complete": bool(progress["epoch_complete"]),
        "sequence": sequence,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hooktrain_version": checkpoint.get("hooktrain_version"),
    }


def write_now_or_in_background(
    checkpoint: Mapping[str, Any],
    record: Mapping[str, Any],
    target: Path,
    *,
    link: Path | None,
    evicted: list[Path],
    background: BackgroundWriter | None,
    encode_inline: bool,
    verbose: bool,
    costs: list[float],
) -> None:
    """Write ``checkpoint`` to ``target`` atomically, make ``link`` (``last.ckpt``)
    the same file, then remove the ``evicted`` checkpoints: on ``background``'s
    thread when one is given, else before returning. The seconds each write took
    are appended to ``costs``.

    :raises CheckpointWriteError: from ``background``, when its previous write failed.
    :raises OSError: without ``background``, when writing fails.
    """
    paths = " and ".join(str(path) for path in (target, link) if path is not None)
    # Private CPU copies, even for a state written now: torch.save writes a view's
    # whole storage (a slice of a large table), and a CUDA tensor as one.
    state = snapshot(checkpoint)
    # A small state is encoded here, on the training thread (well under a
    # millisecond for a small model), leaving the writer only system calls, during
    # which it does not hold the interpreter lock. Pickled on the writer thread
    # instead, the same state slowed training down by more than its own encoding
    # time, contending for the lock.
    encoded = storage.encode(state, record) if encode_inline else None

    def job() -> None:
        begun = time.perf_counter()
        # With a link to follow, one directory fsync after both renames covers both.
        if encoded is not None:
            storage.write_encoded(encoded, target, sync_directory=link is None)
        else:
            storage.write_file(state, target, record, sync_directory=link is None)
        if link is not None:
            storage.link_or_copy(target, link)
        # Evicted files go only once their replacement is complete (either kind:
        # a resumed run may rank against a sharded run's directories).
        for path in evicted:
            sharded.remove(path)
        costs.append(time.perf_counter() - begun)
        if verbose:
            print(f"hooktrain-checkpoint: saved {paths}", file=sys.stderr)

    if background is None:
        job()
    else:
        background.submit(job, paths)
