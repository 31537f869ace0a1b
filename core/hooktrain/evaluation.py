"""The evaluation loop: validation (inside ``fit`` or alone), test and predict.

One pass over each dataloader without gradients, with the model's modules in
eval mode and put back afterwards in exactly the modes they had. Losses and
metrics are batch-size-weighted means over the whole pass, reduced over
processes once at its end.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from hooktrain.batches import STEP_NAMES, batch_size, limited_length, step_batch_size
from hooktrain.epoch_metrics import EpochMetrics
from hooktrain.errors import ConfigurationError, warn_user
from hooktrain.hookcalls import ResolvedHooks
from hooktrain.metrics import warn_if_metrics_unused
from hooktrain.options import check_model, loader_list, why_evaluation_computed_nothing
from hooktrain.publishing import loader_suffix, logging_epoch_end, publish, stage_name
from hooktrain.results import iterate, metric_values, origin, unexpected_result
from hooktrain.rng import fork_rng
from hooktrain.running_means import RunningMeans, process_collectives
from hooktrain.stages import begin_stage, run_stage

if TYPE_CHECKING:
    from torch import nn

    from hooktrain.trainer import Trainer

__all__ = ["STAGE_HOOKS", "concatenable", "evaluation_loop", "run_evaluation"]

#: The hooks each evaluation stage calls, and the prefix of its metric names.
STAGE_HOOKS: dict[str, dict[str, str]] = {
    stage: {
        "start": f"on_{word}_start",
        "epoch_start": f"on_{word}_epoch_start",
        "batch_start": f"on_{word}_batch_start",
        "batch_end": f"on_{word}_batch_end",
        "epoch_end": f"on_{word}_epoch_end",
        "end": f"on_{word}_end",
        "prefix": prefix,
    }
    for stage, word, prefix in (
        ("validate", "validation", "val_"),
        ("test", "test", "test_"),
        ("predict", "predict", ""),
    )
}


def run_evaluation(
    trainer: Trainer,
    stage: str,
    model: nn.Module,
    dataloaders: Any,
    loss_fn: Callable[..., torch.Tensor] | None,
    metrics: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """``validate``, ``test`` or ``predict`` as a whole stage: checks, ``setup``,
    the loop, ``teardown``. ``loss_fn`` and ``metrics`` default to the last fit's,
    for this call alone. Returns the stage's metrics as floats, or for
    ``predict`` ``{"predictions": [one entry per batch]}``.

    :raises ConfigurationError: for a model or dataloaders that cannot be
        evaluated, and when validate or test computed no metric at all.
    """
    check_model(model, training=False, plugin=trainer.plugin_manager.is_registered(model))
    loaders = loader_list("dataloaders", dataloaders)
    if not loaders:
        raise ConfigurationError(f"{stage}() needs at least one dataloader")
    if stage == "predict":
        _warn_if_shuffled(loaders)
    if trainer.interrupted:
        # A script that goes on after a stopped fit (fit returns normally) puts its
        # test values into the stopped run, where a resume does not replace them.
        warn_user(
            f"hooktrain: {stage}() after a fit that was interrupted (trainer.interrupted: "
            f"a SIGTERM stopped it): it evaluates the weights the fit stopped at, and "
            f"loggers record its values in that run, where the resume will not replace "
            f"them. Check trainer.interrupted after fit and leave the evaluation to the "
            f"resumed run"
        )
    # As Keras's evaluate uses what compile set: what the last fit computed
    # with, unless given here, for this call alone.
    fit_fns = trainer.loss_fn, trainer.metric_fns
    begin_stage(
        trainer,
        stage,
        model,
        loss_fn if loss_fn is not None else trainer.loss_fn,
        metrics if metrics is not None else trainer.metric_fns,
    )
    trainer.eval_dataloaders = loaders

    def body() -> dict[str, Any]:
        trainer.plugin_manager.hook.prepare(trainer=trainer, stage=stage)
        trainer._hooks = ResolvedHooks(trainer.plugin_manager, trainer._defaults)
        results = evaluation_loop(trainer, stage, trainer.eval_dataloaders)
        if stage == "predict":
            return results
        if not results:
            raise ConfigurationError(why_evaluation_computed_nothing(trainer, stage))
        return trainer.metrics.floats(results)

    # Seeded, it is reseeded as it starts; the caller's generators are then put
    # back, so that an evaluation draws nothing from them (as in fit).
    try:
        with fork_rng() if trainer.seed is not None else contextlib.nullcontext():
            return run_stage(trainer, stage, body)
    finally:
        trainer.loss_fn, trainer.metric_fns = fit_fns


def _warn_if_shuffled(loaders: list[Any]) -> None:
    # Usually a training loader passed again: its predictions cannot be matched
    # to the dataset's rows. Means (validate, test) do not depend on the order.
    shuffled = [i for i, loader in enumerate(loaders) if _shuffles(loader)]
    if shuffled:
        warn_user(
            f"hooktrain: predict() dataloader(s) {shuffled} shuffle (their sampler draws "
            f"at random): the predictions come in that shuffled order, not the "
            f"dataset's; build the loader with shuffle=False to match them to its rows"
        )


def _shuffles(loader: Any) -> bool:
    """Whether a DataLoader's sampler, or its batch sampler's, draws at random
    (``shuffle=True``, a weighted or subset sampler, a ``DistributedSampler`` that
    shuffles)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, RandomSampler | SubsetRandomSampler | WeightedRandomSampler):
            return True
        if getattr(sampler, "shuffle", False) is True:
            return True
    return False


def evaluation_loop(
    trainer: Trainer, stage: str, loaders: Sequence[Iterable[Any]]
) -> dict[str, Any]:
    """One pass of ``stage`` (``"validate"``, ``"test"`` or ``"predict"``) over
    ``loaders``.

    :return: the stage's metrics by name (``val_loss``...; values may be device
        tensors), or ``{"predictions": [...]}`` for ``predict``: each batch's
        ``forward_step`` result, in order.
    """
    hooks = trainer._hooks
    names = STAGE_HOOKS[stage]
    prefix = names["prefix"]
    on_start = getattr(hooks, names["start"])
    on_epoch_start = getattr(hooks, names["epoch_start"])
    on_batch_start = getattr(hooks, names["batch_start"])
    on_batch_end = getattr(hooks, names["batch_end"])
    on_epoch_end = getattr(hooks, names["epoch_end"])
    on_end = getattr(hooks, names["end"])
    transfer = hooks.transfer_batch_to_device
    forward = hooks.forward_step
    gather = hooks.gather_for_metrics
    limit = trainer.limits[stage]
    trainer.num_eval_batches = [limited_length(loader, limit) for loader in loaders]
    means = RunningMeans()
    # Stateful metrics: a copy per dataloader, so that their values stay apart.
    templates = trainer.metric_fns if stage != "predict" else {}
    stateful = [EpochMetrics(templates, trainer.device, trainer.world_size) for _ in loaders]
    predictions: list[Any] = []
    modes = [(module, module.training) for module in trainer.model.modules()]
    trainer.model.eval()
    # A step-wise validation runs inside a training step: what values logged after
    # it (``on_train_batch_end``) go into, and weigh by, is the training batch's.
    # Values logged here belong to this stage's results, never to the training
    # step's next publication: they get a set of their own.
    stage_pending = trainer._logged_since_publish
    outer = (
        trainer._active_means,
        trainer._log_prefix,
        trainer._epoch_metrics,
        trainer._batch_size,
        stage_pending,
    )
    trainer._active_means, trainer._log_prefix = means, prefix
    trainer._logged_since_publish = set()
    try:
        with torch.no_grad():
            if on_start is not None:
                on_start(trainer=trainer)
            if on_epoch_start is not None:
                on_epoch_start(trainer=trainer)
            for loader_idx, loader in enumerate(loaders):
                suffix = trainer._log_suffix = loader_suffix(loader_idx, len(loaders))
                trainer.dataloader_idx = loader_idx
                trainer._epoch_metrics = stateful[loader_idx]
                iterable = hooks.batch_iterator(
                    trainer=trainer, dataloader=loader, stage=stage, skip_batches=0
                )
                iterable = iterate(trainer.plugin_manager, "batch_iterator", iterable)
                if limit is not None:
                    iterable = itertools.islice(iterable, limit)
                batch_idx = -1
                for batch_idx, batch in enumerate(iterable):
                    batch = transfer(trainer=trainer, batch=batch, device=trainer.device)
                    if on_batch_start is not None:
                        on_batch_start(
                            trainer=trainer,
                            batch=batch,
                            batch_idx=batch_idx,
                            dataloader_idx=loader_idx,
                        )
                    trainer._batch_size = batch_size(batch)
                    outputs = forward(
                        trainer=trainer, batch=batch, batch_idx=batch_idx, stage=stage
                    )
                    trainer._batch_size = step_batch_size(outputs, trainer._batch_size)
                    if stage == "predict":
                        predictions.append(outputs)
                    else:
                        _accumulate(trainer, stage, means, prefix, suffix, outputs, gather)
                    if on_batch_end is not None:
                        on_batch_end(
                            trainer=trainer,
                            outputs=outputs,
                            batch=batch,
                            batch_idx=batch_idx,
                            dataloader_idx=loader_idx,
                        )
                if batch_idx < 0 and limit != 0 and trainer.world_size == 1:
                    # Else every metric it should have given goes missing without a
                    # word, and whatever monitors one blames the model or the name.
                    # (With several processes an uneven split may leave one none.)
                    which = f" {loader_idx}" if len(loaders) > 1 else ""
                    raise ConfigurationError(
                        f"the {stage} dataloader{which} yielded no batches; hooktrain "
                        f"needs at least one"
                        + origin(trainer.plugin_manager, "batch_iterator", "the dataloader's")
                    )
            trainer._log_suffix = ""  # the epoch-end hooks log for every loader at once
            # Every process, whether it saw batches or not: the reduction is collective.
            collectives = process_collectives(trainer)
            results = means.compute(collectives)
            for loader_idx, metrics in enumerate(stateful):
                suffix = loader_suffix(loader_idx, len(loaders))
                for name, value in metrics.compute(collectives).items():
                    results.setdefault(stage_name(name, prefix, suffix), value)
            trainer.metrics.update_raw(results)
            with logging_epoch_end(trainer) as logged:
                if on_epoch_end is not None:
                    if stage == "predict":
                        on_epoch_end(trainer=trainer, predictions=predictions)
                    else:
                        on_epoch_end(trainer=trainer)
                if on_end is not None:
                    on_end(trainer=trainer)
            results.update({name: trainer.metrics.raw(name) for name in logged})
            if stage == "predict":
                # Published by nothing: the stage's end warns about them.
                stage_pending.update(trainer._logged_since_publish, logged)
    finally:
        (
            trainer._active_means,
            trainer._log_prefix,
            trainer._epoch_metrics,
            trainer._batch_size,
            trainer._logged_since_publish,
        ) = outer
        trainer._log_suffix = ""
        trainer.dataloader_idx = 0
        for module, training in modes:
            module.training = training
    if stage == "predict":
        return {"predictions": predictions}
    if any(count != 0 for count in trainer.num_eval_batches):  # limit_*_batches=0: none ran
        warn_if_metrics_unused(trainer, results, prefix, stage)
    publish(trainer, results, stage)
    return results


def _accumulate(
    trainer: Trainer,
    stage: str,
    means: RunningMeans,
    prefix: str,
    suffix: str,
    outputs: Any,
    gather: Any,
) -> None:
    """Add one evaluation batch's loss and metrics to the running means.

    :raises ConfigurationError: when the step returned a loss (a tensor, or the
        ``"loss"`` of a dict) of more than one value (one per sample), which the mean
        would weigh as one; or a loss that is a string (a number formatted).

    Anything else (a tuple of predictions, an object for a plugin's batch-end hook)
    is no metric, and is left out: the step may have logged its values itself.
    """
    if isinstance(outputs, numbers.Real) and not isinstance(outputs, bool):
        # loss.item(): the loss all the same, already on the host.
        means.add(stage_name("loss", prefix, suffix), float(outputs), trainer._batch_size)
        return
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, str):
        # Left out, it would only show as a warning that validation computed nothing.
        raise ConfigurationError(
            f"{STEP_NAMES[stage]} returned its loss as the string {loss!r:.40}; an "
            f"evaluation step returns its loss as a tensor of one value or a number"
            f"{origin(trainer.plugin_manager, 'forward_step')}"
        )
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ConfigurationError(
            f"{STEP_NAMES[stage]} returned a loss of shape {tuple(loss.shape)}; an "
            f"evaluation step returns its loss as one number (reduced over the batch, "
            f"such as reduction='mean')"
            f"{origin(trainer.plugin_manager, 'forward_step')}"
        )
    if isinstance(outputs, torch.Tensor):
        means.add(stage_name("loss", prefix, suffix), outputs.detach(), trainer._batch_size)
        return
    if not isinstance(outputs, Mapping):
        return  # a step that returned None logged what it wanted itself
    if "outputs" in outputs and "targets" in outputs:
        predicted, targets = outputs["outputs"], outputs["targets"]
        size = trainer._batch_size
        gathered = False
        if gather is not None:
            result = gather(trainer=trainer, outputs=predicted, targets=targets)
            if result is not None:
                if not (isinstance(result, tuple | list) and len(result) == 2):
                    raise unexpected_result(
                        trainer.plugin_manager, "gather_for_metrics", result, "(outputs, targets)"
                    )
                # Gathered outputs hold every process's samples: the batch weighs
                # as many times its own weight as gathering multiplied its outputs.
                local = batch_size(predicted)
                predicted, targets = result
                size = size * batch_size(predicted) / local
                gathered = True
                if trainer._epoch_metrics is not None:
                    trainer._epoch_metrics.gathered = True
        values = trainer._hooks.compute_metrics(
            trainer=trainer, outputs=predicted, targets=targets, stage=stage
        )
        for metric, value in metric_values(trainer, values).items():
            if metric in outputs:
                continue  # the step's own value of that name (its loss) wins
            name = stage_name(metric, prefix, suffix)
            means.add(name, value.detach() if isinstance(value, torch.Tensor) else value, size)
            if gathered:
                means.global_names.add(name)
    for key, value in outputs.items():
        if key in ("outputs", "targets", "batch_size"):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            means.add(stage_name(key, prefix, suffix), value.detach(), trainer._batch_size)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            # NumPy's scalars too: what scikit-learn's metrics return.
            means.add(stage_name(key, prefix, suffix), float(value), trainer._batch_size)


def concatenable(predictions: list[Any]) -> bool:
    """Whether ``torch.cat`` joins ``predictions`` without failing or converting:
    tensors of one dtype, on one device, equal past the first dimension."""
    if not predictions or not all(isinstance(p, torch.Tensor) and p.ndim for p in predictions):
        return False
    first = predictions[0]
    return all(
        p.dtype == first.dtype and p.device == first.device and p.shape[1:] == first.shape[1:]
        for p in predictions
    )
