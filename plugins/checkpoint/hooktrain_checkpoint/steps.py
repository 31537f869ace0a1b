"""Step-wise saving, a plugin of its own so that saving per epoch costs no call per batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hooktrain import hookimpl

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer
    from hooktrain_checkpoint.plugin import ModelCheckpoint

__all__ = ["StepSaver"]


class StepSaver:
    """The step-wise saving of a :class:`ModelCheckpoint` with ``every_n_train_steps``:
    a plugin of its own, registered as ``<name>.steps`` by the checkpoint's ``setup``
    for one fit and unregistered by its ``teardown``.

    Any ``on_train_batch_end`` implementation costs a call on every batch, so the
    checkpoint plugin does not implement it itself: saving per epoch adds none.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    # trylast: registered during setup, the saver cannot take the checkpoint's place
    # in the plugin list, and a save should hold what every other plugin did at the
    # end of the step (metrics logged, state updated), whatever the list order.
    @hookimpl(trylast=True)
    def on_train_batch_end(self, trainer: Trainer) -> None:
        # Gradients of a half-accumulated window are not in a checkpoint, so only
        # a batch that completed an optimizer step is a consistent place to save.
        every = self.checkpoint.every_n_train_steps
        if every is None or not trainer.sync_gradients:
            return
        if trainer.global_step % every == 0 and trainer.global_step > 0:
            self.checkpoint._save(trainer, ranked=True)
