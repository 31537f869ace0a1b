"""SIGTERM turned into the core's own way of stopping, agreed between processes."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["SigtermWatch", "report"]


def report(trainer: Trainer, text: str) -> None:
    """Print ``text`` to stderr from the global-zero process, flushed at once: the
    scheduler that sent the signal may kill the process soon after."""
    if trainer.is_global_zero:
        print(f"hooktrain-checkpoint: {text}", file=sys.stderr, flush=True)


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

    def install(self, trainer: Trainer) -> None:
        """Start watching for ``trainer``'s fit. Python runs signal handlers in the
        main thread only, so from another thread this only resets the state."""
        self.received = False
        self.inside_epoch = False
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def restore(self) -> None:
        """Put back the handler that was there before :meth:`install`."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
            self._previous = None
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
