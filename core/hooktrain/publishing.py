"""Logged values: the names they take, and when they reach the loggers.

A value recorded with ``trainer.log`` (or computed by the loop) is stored, not
read; `publish` turns the named values into floats for ``log_metrics`` at a log
point, an epoch's end or a stage's end, and reads nothing when no plugin
implements ``log_metrics``. A training log point is also where the losses since
the last one are checked to be finite, since values are read there anyway.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import ConfigurationError, NonFiniteLossError, warn_user
from hooktrain.losses import agreed_finite

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

#: What a metric's name gets when a stage has several dataloaders (``val_acc`` of the
#: second is ``val_acc/dataloader_idx_1``).
LOADER_SUFFIX = "/dataloader_idx_"


def stage_name(name: str, prefix: str, suffix: str = "") -> str:
    """``name`` as a metric of the running stage: with the stage's prefix
    (``val_``, ``test_``) unless it starts with it already, and the dataloader's
    suffix unless it ends with it. One rule for what ``trainer.log`` records and
    what a step returns, so ``{"val_acc": ...}`` stays ``val_acc`` both ways."""
    if not name.startswith(prefix):
        name = prefix + name
    if suffix and not name.endswith(suffix):
        name += suffix
    return name


def loader_suffix(index: int, count: int) -> str:
    """The suffix of the names of dataloader ``index``'s metrics among ``count``
    loaders: none for a single loader."""
    return f"{LOADER_SUFFIX}{index}" if count > 1 else ""


def log_value(trainer: Trainer, name: str, value: Any, batch_size: Any) -> None:
    """What ``Trainer.log`` does (its docstring says it for users).

    :raises ConfigurationError: for a tensor of more than one element, a value
        that is neither a number nor a tensor, or the name ``"loss"`` in a training
        batch (the loop's own).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigurationError(
                f"trainer.log({name!r}, ...) needs a single number, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        value = value.detach()
    elif not isinstance(value, int | float):
        if not isinstance(value, numbers.Real):
            raise ConfigurationError(
                f"trainer.log({name!r}, ...) needs a number or a tensor, got {type(value).__name__}"
            )
        value = float(value)  # a NumPy scalar, as a step's returned values may be
    if batch_size is not None and not _is_weight(batch_size):
        raise ConfigurationError(
            f"trainer.log({name!r}, ..., batch_size={batch_size!r}) needs a positive "
            f"number (or a one-element tensor) as the value's weight in the epoch's mean"
        )
    if name == "loss" and trainer._active_means is trainer._train_means:
        # Averaged with the returned loss into one "loss": a mean of two things.
        raise ConfigurationError(
            "trainer.log('loss', ...) in a training batch: 'loss' is the loop's own name "
            "for the loss the training step returned, which it logs already, and the two "
            "would be averaged into one value. Log a part of the loss under a name of its "
            "own (trainer.log('data_loss', ...)), or drop a call that logs the returned "
            "loss again (Lightning's self.log('loss', loss))"
        )
    name = stage_name(name, trainer._log_prefix, trainer._log_suffix)
    trainer.metrics.set(name, value)
    if trainer._epoch_end_logs is not None:
        trainer._epoch_end_logs.add(name)
    else:
        trainer._logged_since_publish.add(name)
    if trainer._active_means is not None:
        trainer._active_means.add(
            name, value, trainer._batch_size if batch_size is None else batch_size
        )
    elif trainer._epoch_end_logs is None:
        trainer._logged_outside_batches.add(name)


def _is_weight(batch_size: Any) -> bool:
    # A tensor (a token count) is not read, which would sync; 0 was once taken as
    # "not given", and a weight of 0 or less leaves an epoch's mean undefined.
    if isinstance(batch_size, torch.Tensor):
        return batch_size.numel() == 1
    return (
        isinstance(batch_size, numbers.Real) and not isinstance(batch_size, bool) and batch_size > 0
    )


def publish(trainer: Trainer, names: Iterable[str], scope: str) -> None:
    """Call ``log_metrics`` with ``names`` as floats, in name order, at
    ``trainer.global_step``; nothing is read from the device when no plugin
    listens."""
    log_metrics = trainer._hooks.log_metrics if trainer._hooks else None
    if log_metrics is None:
        return
    # Sorted: ``names`` is often a set, whose order changes with PYTHONHASHSEED,
    # and a logger's columns follow the order it first sees names in.
    values = trainer.metrics.floats(sorted(names))
    if values:
        log_metrics(trainer=trainer, metrics=values, step=trainer.global_step, scope=scope)


@contextlib.contextmanager
def logging_epoch_end(trainer: Trainer) -> Iterator[set[str]]:
    """Collect the names logged inside the block (a stage's epoch-end hooks):
    they are published with that epoch, not at the next step."""
    trainer._epoch_end_logs = logged = set()
    try:
        yield logged
    finally:
        trainer._epoch_end_logs = None


def publish_step(trainer: Trainer) -> None:
    """A log point inside the epoch: publish the loss and whatever was logged since
    the last one (the loop checked the losses right after the optimizer step)."""
    publish(trainer, {"loss", *trainer._logged_since_publish}, "step")
    trainer._logged_since_publish.clear()


def warn_if_never_published(trainer: Trainer, names: set[str]) -> None:
    """Warn, as a stage ends, about the ``names`` ``trainer.log`` recorded that no
    publication took: they are in ``trainer.metrics``, but no logger got them.
    Lightning refuses ``self.log`` where it could not publish; a warning keeps the
    value for whoever reads ``trainer.metrics`` afterwards."""
    if not names or not trainer.plugin_manager.hook.log_metrics.get_hookimpls():
        return
    stage = trainer.stage
    if stage == "fit":
        why = (
            "logged in on_fit_end or teardown, or before max_steps or a stop ended the "
            "fit ahead of the next log point and epoch end; log a fit's summary values "
            "in on_train_epoch_end or on_validation_end"
        )
    elif stage == "predict":
        why = "predict() publishes no values"
    else:
        end = "on_validation_end" if stage == "validate" else f"on_{stage}_end"
        why = (
            f"logged in setup or teardown, outside the {stage} run, whose values are "
            f"published as it ends; log it in {end}"
        )
    warn_user(
        f"hooktrain: {', '.join(map(repr, sorted(names)))}, logged with trainer.log, "
        f"reached no logger, only trainer.metrics: {why}"
    )


def check_finite(trainer: Trainer, *, fold: bool = True, outcome: str = "") -> None:
    """Raise if any loss since the last check was NaN or infinite. Called where the
    loop reads values anyway (a log point, an epoch's end), so it adds no sync per
    step; with ``fold=False`` as a fit ends and by ``dump_checkpoint`` in the middle
    of an epoch, which leave the losses not yet summed so for the checkpoint (a
    resume then sums them in the same groups as a run never stopped). ``outcome``
    is said in the error, after the steps.

    :raises NonFiniteLossError: naming the steps since the last check (on every
        process, which agree on it), or the epoch's sums a resume started with.
    """
    means = trainer._train_means
    # All processes check at the same points and stop together.
    finite = agreed_finite(
        trainer, means.fold_finite("loss") if fold else means.pending_finite("loss")
    )
    if finite is None:
        return
    first, last = trainer._checked_steps_from, trainer.global_step
    if fold:  # without, the values stay pending, and the next check reads them again
        trainer._checked_steps_from = last + 1
    if finite:
        return
    if first > last:
        where = f"before global step {first}, in the epoch's sums the run resumed with"
    else:
        where = f"between global steps {first} and {last}"
    if trainer.world_size > 1:  # every process raises, the finite ones too
        where += f" on at least one of the {trainer.world_size} processes"
    raise NonFiniteLossError(
        f"the training loss became NaN or infinite {where} (epoch "
        f"{trainer.current_epoch}){outcome}; pass check_finite_every_step=True to find "
        f"the exact step"
    )
