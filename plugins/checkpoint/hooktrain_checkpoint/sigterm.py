"""SIGTERM turned into the core's own way of stopping, agreed between processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["SigtermWatch", "WorkerSigterm", "report"]


def report(trainer: Trainer, text: str) -> None:
    """Print ``text`` to stderr from the global-zero process, flushed at once: the
    scheduler that sent the signal may kill the process soon after."""
    if trainer.is_global_zero:
        print(f"hooktrain-checkpoint: {text}", file=sys.stderr, flush=True)


class WorkerSigterm:
    """A DataLoader ``worker_init_fn``: runs the loader's own ``worker_init_fn``
    (``inner``), then makes the worker end on a SIGTERM from its parent (the main
    process shutting it down) and ignore one from anyone else.

    A scheduler may signal every process of a job (Slurm signals the whole step).
    torch's handler in a worker exits quietly when the parent sent the signal and
    dies otherwise, and the main process then raises "DataLoader worker ... is
    killed by signal: Terminated" at its next batch, before it could save. Here
    the signal is blocked and a thread waits for it, reading who sent it
    (``signal.sigwaitinfo``).

    Blocking reaches only threads started after it, so this is done only in a
    worker with a single thread (a forked one, Linux's default); a spawned worker
    already runs a native thread of torch's, and is left to torch's handling, as
    is a platform without ``sigwaitinfo`` and a worker whose own ``worker_init_fn``
    set a SIGTERM handler. A module-level class, so that a spawned loader can
    pickle it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        before = signal.getsignal(signal.SIGTERM)
        if self.inner is not None:
            self.inner(worker_id)
        if (
            hasattr(signal, "sigwaitinfo")
            and signal.getsignal(signal.SIGTERM) == before
            and _threads() == 1
        ):
            # Blocked before the thread starts, so in every thread from now on:
            # only the waiting thread receives it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=_end_on_parents_sigterm, daemon=True).start()


def _threads() -> int:
    """The number of threads of this process, native ones included (0 when the
    platform does not say)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _end_on_parents_sigterm() -> None:
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as torch's worker does when its parent terminates it


class SigtermWatch:
    """Notes a SIGTERM during a fit and asks the trainer to stop.

    The handler saves nothing: it runs between two bytecodes of the training
    thread, anywhere. It sets ``trainer.should_stop``, which the core honours after
    an optimizer step (agreed between processes), and the plugin saves once the
    loop has stopped. That needs no hook per step.
    """

    def __init__(self) -> None:
        #: Whether a SIGTERM arrived (in any process, once :meth:`agreed` ran).
        self.received = False
        #: Whether the loop is between an epoch's start and its end, where the core
        #: agrees on ``should_stop`` after every optimizer step.
        self.inside_epoch = False
        self._trainer: Trainer | None = None
        self._previous: Any = None
        self._installed = False
        self._shielded: list[tuple[Any, Any]] = []  # (loader, its own worker_init_fn)

    def install(self, trainer: Trainer) -> None:
        """Start watching for ``trainer``'s fit. Python runs signal handlers in the
        main thread only, so from another thread this only resets the state."""
        self.received = False
        self.inside_epoch = False
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def shield_workers(self, trainer: Trainer) -> None:
        """Make the worker processes of the fit's dataloaders, as they start, ignore
        a SIGTERM not sent by their parent (`WorkerSigterm`), so that a signal to
        the whole process group is saved on, not a crash. Called once plugins have
        built their loaders; each gets its own ``worker_init_fn`` back in
        :meth:`restore`."""
        from torch.utils.data import DataLoader

        for loader in [trainer.train_dataloader, *trainer.eval_dataloaders]:
            if (
                isinstance(loader, DataLoader)
                and loader.num_workers > 0
                and not isinstance(loader.worker_init_fn, WorkerSigterm)
            ):
                self._shielded.append((loader, loader.worker_init_fn))
                loader.worker_init_fn = WorkerSigterm(loader.worker_init_fn)

    def restore(self) -> None:
        """Put back the handler that was there before :meth:`install`, and the
        loaders' own ``worker_init_fn``."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
            self._previous = None
        for loader, own in self._shielded:
            loader.worker_init_fn = own
        self._shielded = []
        self._trainer = None

    def agreed(self, trainer: Trainer) -> bool:
        """Whether any process received SIGTERM. A collective (one ``all_reduce``):
        every process must call it at the same point."""
        import torch

        flag = torch.tensor([1.0 if self.received else 0.0], device=trainer.device)
        self.received = bool(trainer.all_reduce(flag).item() > 0)
        return self.received

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        trainer = self._trainer
        if trainer is None:
            return
        if trainer.world_size <= 1 or self.inside_epoch:
            trainer.should_stop = True
        # Else (several processes, outside an epoch's batches): the core agrees on
        # should_stop after optimizer steps and once after each epoch's end, but a
        # signal landing after that agreement would be read by this process alone,
        # splitting the processes. The flag is agreed on at the next epoch start or
        # end, or fit end, whichever comes first.
