"""The fit loop: epochs, and the one batch loop inside them.

The work on one micro-batch (forward, loss, backward) is built once per stage by
`make_train_step` from the resolved hooks, the way Keras builds its
``train_function``; ending an accumulation window is built likewise by
`hooktrain.optimization.make_optimizer_step`. The batch loop then reads the
same whoever implements what: move the batch, train on it, step when the window
is complete, record the loss, validate when due, tell plugins, publish when due,
stop when asked.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.batches import batch_size, check_model_steps, limited_length, step_batch_size
from hooktrain.epoch_metrics import EpochMetrics
from hooktrain.errors import ConfigurationError, NonFiniteLossError, PluginError, warn_user
from hooktrain.evaluation import evaluation_loop
from hooktrain.hookcalls import ResolvedHooks
from hooktrain.losses import agreed_finite, loss_of, raise_bad_loss
from hooktrain.metrics import warn_if_metrics_unused
from hooktrain.optimization import (
    check_optimizers_hold_the_model,
    check_unchanged_since_prepare,
    configure_optimizers,
    learning_rates,
    make_optimizer_step,
    step_monitoring_schedulers,
    step_scheduler,
)
from hooktrain.options import (
    check_monitors,
    refuse_manual_optimization,
    warn_if_fit_ends_too_soon,
    warn_if_launched_but_alone,
)
from hooktrain.publishing import check_finite, logging_epoch_end, publish, publish_step
from hooktrain.replay import epoch_batches, warn_if_epoch_length_changed
from hooktrain.results import metric_values, origin, unexpected_result
from hooktrain.rng import fork_rng, set_rng_state
from hooktrain.running_means import process_collectives
from hooktrain.state import check_loaded

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["make_train_step", "run_fit"]

#: ``train_step(batch, batch_idx) -> (outputs, loss)``
TrainStep = Callable[[Any, int], tuple[Any, torch.Tensor]]


def run_fit(trainer: Trainer, optimizer: Any, ckpt_path: str | os.PathLike[str] | None) -> None:
    """The body of ``fit``, between ``setup`` and ``teardown``."""
    trainer.optimizers, trainer._schedulers = configure_optimizers(trainer.module, optimizer)
    trainer.lr_schedulers = [entry.scheduler for entry in trainer._schedulers]
    trainer._configured_lrs = learning_rates(trainer.optimizers)  # before a resume loads any
    refuse_manual_optimization(trainer.module, len(trainer.optimizers))
    check_model_steps(trainer.module, ("train", "validate") if _validates(trainer) else ("train",))
    check_monitors(trainer)
    warn_if_fit_ends_too_soon(trainer)
    warn_if_launched_but_alone(trainer)
    _start_progress(trainer)
    trainer.plugin_manager.hook.prepare(trainer=trainer, stage="fit")
    if len(trainer.lr_schedulers) != len(trainer._schedulers):
        raise PluginError("a prepare implementation changed the number of LR schedulers")
    for entry, scheduler in zip(trainer._schedulers, trainer.lr_schedulers, strict=True):
        entry.scheduler = scheduler  # a plugin may have wrapped it
    check_optimizers_hold_the_model(trainer.module, trainer.optimizers)
    prepared = (trainer.model, list(trainer.optimizers))
    hooks = trainer._hooks = ResolvedHooks(trainer.plugin_manager, trainer._defaults)
    if ckpt_path is not None:
        checkpoint = hooks.load_checkpoint(trainer=trainer, ckpt_path=os.fspath(ckpt_path))
        check_loaded(trainer, checkpoint)
        if checkpoint:
            trainer.restore_checkpoint(checkpoint)
    trainer._fit_start_step = trainer.global_step
    if hooks.on_fit_start is not None:
        hooks.on_fit_start(trainer=trainer)
    train_step = make_train_step(trainer, hooks)
    optimizer_step = make_optimizer_step(trainer, hooks)
    while _next_epoch(trainer):
        check_unchanged_since_prepare(trainer, prepared)
        _train_epoch(trainer, hooks, train_step, optimizer_step)
        if trainer.world_size > 1:
            # should_stop set at an epoch's end (early stopping, a signal) must stop
            # every process here, or those going on wait in the next collective.
            _agree_on_stop(trainer)
    # Values logged in the batches of an epoch left open (max_steps, a stop) and
    # not published yet wait for its resume, which recomputes the epoch's means;
    # any other value still pending reaches no logger, and is warned about.
    trainer._logged_since_publish.difference_update(trainer._train_means.names())
    # A fit that max_steps or a stop ended between log points: its last losses are
    # read here, or NaN weights would be returned without a word. Not summed: a
    # checkpoint saved in on_fit_end keeps them as a run never stopped sums them.
    check_finite(trainer, fold=False)
    check_unchanged_since_prepare(trainer, prepared)
    if hooks.on_fit_end is not None:
        hooks.on_fit_end(trainer=trainer)


def make_train_step(trainer: Trainer, hooks: ResolvedHooks) -> TrainStep:
    """Build the function that trains on one micro-batch already on the device.

    ``train_step(batch, batch_idx)`` calls ``forward_step(stage="train")``, checks
    the loss (a 0-dim tensor that requires grad), divides it by
    ``accumulate_grad_batches``, and runs ``on_before_backward``, ``backward`` and
    ``on_after_backward``. It returns ``(outputs, loss)``: what ``forward_step``
    returned and the undivided loss.

    :raises ConfigurationError: when the step returned no usable loss.
    :raises NonFiniteLossError: with ``check_finite_every_step``, before backward,
        when the loss is NaN or infinite.
    """
    forward = hooks.forward_step
    on_before_backward = hooks.on_before_backward
    backward = hooks.backward
    on_after_backward = hooks.on_after_backward
    accumulate = trainer.accumulate_grad_batches
    check_every_step = trainer.check_finite_every_step
    tensor = torch.Tensor

    def train_step(batch: Any, batch_idx: int) -> tuple[Any, torch.Tensor]:
        outputs = forward(trainer=trainer, batch=batch, batch_idx=batch_idx, stage="train")
        # The usual tensor or dict settled without the Mapping ABC's check.
        loss = outputs.get("loss") if type(outputs) is dict else outputs
        if type(loss) is not tensor:
            loss = loss_of(outputs, trainer)
        if loss.ndim != 0 or not loss.requires_grad:
            raise_bad_loss(loss, trainer)
        if check_every_step and not agreed_finite(trainer, torch.isfinite(loss)):
            # Before backward, so the bad step never reaches the weights.
            # "global step" as everywhere else: the steps taken, this one not yet.
            value = loss.item()
            if (processes := trainer.world_size) > 1:
                value = f"not finite on at least one of the {processes} processes (here {value})"
            raise NonFiniteLossError(
                f"the training loss is {value} at epoch {trainer.current_epoch}, "
                f"batch {batch_idx}, global step {trainer.global_step}: the step that "
                f"would have made it {trainer.global_step + 1} was not taken"
            )
        scaled = loss / accumulate if accumulate > 1 else loss
        if on_before_backward is not None:
            on_before_backward(trainer=trainer, loss=scaled)
        done = backward(trainer=trainer, loss=scaled)
        if done is not True:
            raise unexpected_result(trainer.plugin_manager, "backward", done, "True")
        if on_after_backward is not None:
            on_after_backward(trainer=trainer)
        return outputs, loss

    return train_step


def _train_epoch(
    trainer: Trainer,
    hooks: ResolvedHooks,
    train_step: TrainStep,
    optimizer_step: Callable[[int], None],
) -> None:
    """One training epoch (or the rest of one, after a mid-epoch resume).

    The model trains in the modes its modules are in: a module the user put in
    eval mode (a frozen BatchNorm) stays there, and evaluation puts every mode
    back as it found it.
    """
    skip = trainer._resume_skip
    batches, total = _open_epoch(trainer, hooks, skip)
    means = trainer._train_means
    device = trainer.device
    transfer = hooks.transfer_batch_to_device
    on_batch_start = hooks.on_train_batch_start
    on_batch_end = hooks.on_train_batch_end
    accumulate = trainer.accumulate_grad_batches
    log_every = trainer.log_every_n_steps
    val_every = trainer.val_every_n_steps if _validates(trainer) else None
    metric_fns = trainer.metric_fns
    metrics = trainer.metrics
    distributed = trainer.world_size > 1
    monitoring = any(e.interval == "step" and e.monitor for e in trainer._schedulers)
    trainer._active_means = means
    trainer._epoch_metrics = trainer._train_metrics
    window = 0  # micro-batches in the open accumulation window
    batch_idx = skip
    stopped = False
    for batch in batches:
        batch = transfer(trainer=trainer, batch=batch, device=device)
        if on_batch_start is not None:
            on_batch_start(trainer=trainer, batch=batch, batch_idx=batch_idx)
        window += 1
        sync = window == accumulate or batch_idx + 1 == total
        trainer.sync_gradients = sync
        # Sized before the step, which may take its batch apart (values it logs use it).
        trainer._batch_size = batch_size(batch)
        outputs, loss = train_step(batch, batch_idx)
        trainer._batch_size = size = step_batch_size(outputs, trainer._batch_size)
        # Recorded before the optimizer step, so that the hooks it calls
        # (on_before_optimizer_step, on_before_zero_grad) read this step's loss.
        detached = loss.detach()
        means.add("loss", detached, size)
        metrics.set("loss", detached)
        if sync:
            optimizer_step(window)
            window = 0
        publishes = sync and trainer.global_step % log_every == 0
        if publishes:
            # Summed before any hook of this step can checkpoint the running means, so
            # that a run resumed from it sums the same groups (the same epoch means),
            # and checked before any can validate or save weights a NaN trained.
            check_finite(trainer)
        if (
            metric_fns
            and (type(outputs) is dict or isinstance(outputs, Mapping))
            and "outputs" in outputs
            and "targets" in outputs
        ):
            _add_metric_values(trainer, hooks, outputs["outputs"], outputs["targets"], size)
        batch_idx += 1
        trainer.epoch_batches_done = batch_idx
        if val_every is not None and sync and trainer.global_step % val_every == 0:
            _validate(trainer)
        if sync and monitoring:
            step_monitoring_schedulers(trainer)
        if on_batch_end is not None:
            on_batch_end(trainer=trainer, outputs=outputs, batch=batch, batch_idx=batch_idx - 1)
        if publishes:
            publish_step(trainer)
        # Stop only where an optimizer step just happened: inside an accumulation
        # window the gradients gathered so far would be lost with the stop.
        if sync:
            if distributed:
                _agree_on_stop(trainer)
            if _should_stop(trainer):
                stopped = True
                break

    if batch_idx == skip and skip == 0:
        raise ConfigurationError(
            "the training dataloader yielded no batches in epoch "
            f"{trainer.current_epoch}; hooktrain needs at least one"
            + origin(trainer.plugin_manager, "batch_iterator", "the dataloader's")
        )
    if window:
        # The iterator ended inside an accumulation window (its length was unknown
        # or wrong): the window is stepped with the micro-batches it holds, after
        # its last on_train_batch_end. Its step has no log point of its own: the
        # epoch's end publishes next, and what was logged during the step (a
        # clipped gradient norm) still counts in the epoch's means.
        trainer.sync_gradients = True
        optimizer_step(window)
        if monitoring:
            step_monitoring_schedulers(trainer)
    trainer._active_means = trainer._epoch_metrics = None
    # The iterator's end is the epoch's end; a stop at the last batch of a known
    # length ends it too. Any other stop leaves the epoch open: no epoch end runs,
    # and a resume continues it.
    exhausted = not stopped or (total is not None and batch_idx >= total)
    # (A resume past a now shorter epoch's end yields nothing; it was warned above.)
    if (
        not stopped
        and total is not None
        and batch_idx != total
        and skip < total
        and not trainer._warned_length
    ):
        trainer._warned_length = True
        warn_user(
            f"hooktrain: the training dataloader ({type(trainer.train_dataloader).__name__}) "
            f"said it has "
            f"{total} batches (len) but yielded {batch_idx}; its end was taken as the "
            f"epoch's end",
        )
    if not exhausted:
        return
    _end_epoch(trainer, hooks)


def _open_epoch(
    trainer: Trainer, hooks: ResolvedHooks, skip: int
) -> tuple[Iterator[Any], int | None]:
    """Everything before an epoch's first batch: progress, ``on_train_epoch_start``
    and the epoch's iterator. :return: the iterator and the number of batches the
    epoch should have (``None`` when unknown)."""
    trainer._resume_skip = 0
    if skip == 0:
        trainer._train_means.reset()
        trainer._train_metrics.reset()
        trainer._epoch_validation = None
        _apply_pending_rng(trainer)
    trainer.epoch_batches_done = skip
    trainer.epoch_complete = False
    # Until the iterator is made, the loader's generators are where this epoch
    # starts from, and a checkpoint holds them (not the last epoch's start).
    trainer._epoch_start_state = None
    loader = trainer.train_dataloader
    limit = trainer.limits["train"]
    total = trainer.num_training_batches = limited_length(loader, limit)
    if skip:
        warn_if_epoch_length_changed(trainer, skip, total)
    if hooks.on_train_epoch_start is not None:
        hooks.on_train_epoch_start(trainer=trainer)
    batches = epoch_batches(trainer, hooks, loader, skip)
    if limit is not None:
        batches = itertools.islice(batches, max(0, limit - skip))
    _apply_pending_rng(trainer)  # a mid-epoch resume: after the iterator drew its seeds
    # What a resume restored is applied now, or was not needed (a checkpoint taken
    # before the epoch's first batch): a checkpoint from here on holds this epoch's.
    trainer._pending_epoch_data = trainer._pending_generators = trainer._resume_split = None
    return batches, total


def _end_epoch(trainer: Trainer, hooks: ResolvedHooks) -> None:
    check_finite(trainer)
    means = trainer._train_means
    collectives = process_collectives(trainer)
    # A value logged in the epoch's batches goes out with it as its mean (which the
    # next epoch's first log point must not publish as a step's value); one logged
    # outside them (setup, on_fit_start, on_train_epoch_start) as it is.
    outside = set(trainer._logged_outside_batches)
    trainer._logged_outside_batches.clear()
    trainer._logged_since_publish.clear()
    trainer.metrics.update_raw(means.compute(collectives))
    epoch_values = trainer._train_metrics.compute(collectives)
    trainer.metrics.update_raw(epoch_values)
    computed = means.names() | set(epoch_values)
    warn_if_metrics_unused(trainer, computed, "", "train")
    if (
        _validates(trainer)
        and (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0
        # A step-wise validation at this epoch's last step saw these same weights.
        and trainer._validated_at_step != trainer.global_step
    ):
        _validate(trainer)
    # Every validation of the epoch counts, the step-wise ones (val_every_n_steps)
    # too: a plateau scheduler on val_loss steps after an epoch that computed it.
    validated = trainer._epoch_validation is not None
    computed |= trainer._epoch_validation or set()
    for entry in trainer._schedulers:
        if entry.interval == "epoch" and (trainer.current_epoch + 1) % entry.frequency == 0:
            step_scheduler(trainer, entry, computed, validated)
    # From here a checkpoint resumes at the next epoch.
    trainer.epoch_complete = True
    with logging_epoch_end(trainer) as logged:
        if hooks.on_train_epoch_end is not None:
            hooks.on_train_epoch_end(trainer=trainer)
    publish(trainer, means.names() | set(epoch_values) | logged | outside, "epoch")


def _validates(trainer: Trainer) -> bool:
    # limit_val_batches=0 turns validation in fit off, as in Lightning: no
    # validation hook runs on no batch (a plugin would read an empty validation as
    # one that computed nothing).
    return bool(trainer.eval_dataloaders) and trainer.limits["validate"] != 0


def _validate(trainer: Trainer) -> None:
    """Validation inside ``fit``; the names it computed join the epoch's
    (``trainer._epoch_validation``). It must not change training, so every global
    random generator is put back afterwards (its dataloaders draw seeds, its
    datasets may draw numbers), and so are the training loader's own, which a
    validation loader may share."""
    with fork_rng(trainer.train_dataloader) as training_state:
        # A checkpoint taken during validation holds the state training goes on
        # from, not the one validation's loaders drew from.
        trainer._rng_outside_validation = training_state
        try:
            results = evaluation_loop(trainer, "validate", trainer.eval_dataloaders)
        finally:
            trainer._rng_outside_validation = None
    if not results and not trainer._warned_empty_validation:
        # validate() raises for this; in fit it would go unseen until something
        # that monitors a validation metric finds nothing to read.
        trainer._warned_empty_validation = True
        warn_user(
            "hooktrain: validation in fit computed no metric: the model's validation_step "
            "returned no number and nothing was logged with trainer.log (or, for a plain "
            "model, fit had no loss_fn and no metrics). Return the loss, or a dict of "
            "values, from validation_step"
        )
    trainer._validated_at_step = trainer.global_step
    trainer._epoch_validation = (trainer._epoch_validation or set()) | set(results)


def _add_metric_values(
    trainer: Trainer, hooks: ResolvedHooks, outputs: Any, targets: Any, size: int
) -> None:
    values = hooks.compute_metrics(trainer=trainer, outputs=outputs, targets=targets, stage="train")
    for name, value in metric_values(trainer, values).items():
        trainer._train_means.add(name, value, size)
        trainer.metrics.set(name, value)


def _start_progress(trainer: Trainer) -> None:
    """Progress as a new fit starts it (a checkpoint may then replace it)."""
    trainer.current_epoch = 0
    trainer.global_step = 0
    trainer.epoch_batches_done = 0
    trainer.epoch_complete = False
    trainer._resume_skip = 0
    trainer._pending_rng = None
    trainer._pending_epoch_data = None
    trainer._pending_generators = None
    trainer._resume_split = None
    trainer._epoch_start_state = None
    trainer._validated_at_step = -1
    trainer._epoch_validation = None
    trainer._warned_length = False
    trainer._warned_empty_validation = False
    trainer._train_means.reset()
    trainer._train_metrics = EpochMetrics(trainer.metric_fns, trainer.device, trainer.world_size)
    trainer._checked_steps_from = 1
    trainer.data_seed = (
        trainer.seed if trainer.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    )


def _apply_pending_rng(trainer: Trainer) -> None:
    if trainer._pending_rng is not None:
        set_rng_state(trainer._pending_rng)
        trainer._pending_rng = None


def _next_epoch(trainer: Trainer) -> bool:
    """Whether an epoch is to be trained, moving ``current_epoch`` on when the one it
    holds is complete. Once the loop ends ``current_epoch`` stays on the last epoch
    trained, or restored: rerunning a finished run changes no progress."""
    if _should_stop(trainer):
        return False
    if trainer.epoch_complete:
        if trainer.current_epoch + 1 >= trainer.max_epochs:
            return False
        trainer.current_epoch += 1
    return trainer.current_epoch < trainer.max_epochs


def _should_stop(trainer: Trainer) -> bool:
    return trainer.should_stop or (
        trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
    )


def _agree_on_stop(trainer: Trainer) -> None:
    # One process deciding to stop (a signal, early stopping) must stop all of
    # them at the same batch, or the others wait forever in the next collective.
    flag = torch.tensor([1.0 if trainer.should_stop else 0.0], device=trainer.device)
    trainer.should_stop = bool(trainer.all_reduce(flag).item() > 0)
