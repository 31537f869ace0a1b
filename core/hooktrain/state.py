"""What a checkpoint holds, and putting a run back where one was taken.

A checkpoint is a mapping of tensors, numbers, strings, lists and dicts, so that
``torch.load(weights_only=True)`` reads it without running pickled code. The
format is described in ``docs/checkpointing.md``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hooktrain.errors import ConfigurationError
from hooktrain.loadable import require_loadable
from hooktrain.optimization import warn_if_learning_rate_changed
from hooktrain.publishing import check_finite
from hooktrain.replay import SPLIT, epoch_split, warn_if_workers_persist
from hooktrain.results import unexpected_result
from hooktrain.rng import loader_generators, rng_state
from hooktrain.running_means import process_collectives

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = [
    "check_count",
    "check_optimizer_kind",
    "check_scheduler_kind",
    "dump_checkpoint",
    "require_checkpoint",
    "restore_checkpoint",
]

FORMAT = "hooktrain-checkpoint/1"

# What torch.compile's module wrapper puts before every key of the module inside.
_COMPILED_PREFIX = "_orig_mod."

_INSTALLED_VERSIONS: dict[str, str] = {}


def _installed_versions() -> dict[str, str]:
    """Installed plugin versions by entry-point name, read once per process:
    reading package metadata takes 10 to 20 ms, a tenth of a short fit that
    saves once."""
    if not _INSTALLED_VERSIONS:
        from hooktrain.plugins import installed_plugins

        _INSTALLED_VERSIONS.update(
            {name: plugin.version for name, plugin in installed_plugins().items()}
        )
    return _INSTALLED_VERSIONS


def dump_checkpoint(trainer: Trainer) -> dict[str, Any]:
    """See `hooktrain.Trainer.dump_checkpoint`."""
    if trainer.module is None:
        raise ConfigurationError("dump_checkpoint() needs a model: call it during fit")
    from hooktrain import __version__

    installed = _installed_versions()
    collectives = process_collectives(trainer)
    model_state, optimizer_states = _state_dicts(trainer)
    # What only a resume in the middle of an epoch reads: at an epoch's end the next
    # epoch starts afresh, and leaving these out saves four tensors a checkpoint.
    # (The same on every process, so the collectives below run on all or none.)
    mid_epoch = not trainer.epoch_complete
    if mid_epoch:
        # Between two log points the loop reads no loss: weights a NaN trained would
        # be saved, and kept by recency replace the last good file. (At an epoch's
        # end the loop has checked every loss.)
        check_finite(
            trainer,
            fold=False,
            outcome=(
                f"; the checkpoint due at global step {trainer.global_step} was not "
                f"written: any saved earlier came before it"
            ),
        )
    running_means = trainer._train_means.state_dict(collectives) if mid_epoch else {}
    # From a resume to the first batch it trains (on_fit_start, or a finished run
    # rerun) what was restored waits to be applied: a checkpoint then holds that,
    # not the fresh run's state, or the next resume would start elsewhere. Inside a
    # validation in fit, the state is the one training goes on from.
    pending = trainer._pending_rng or trainer._rng_outside_validation
    # What decided the current epoch's data: a resume in its middle replays it.
    epoch_start = (trainer._pending_epoch_data or trainer._epoch_start_state) if mid_epoch else None
    random_states = {
        "rng": rng_state() if pending is None else pending,
        "epoch_start_state": epoch_start,
    }
    if trainer.world_size > 1:
        # Each process's own, in rank order: processes may draw different numbers
        # (a loader that iterates its dataset on rank 0 only), and each resumes
        # from its own. The top-level ones are rank 0's.
        by_rank = collectives.all_gather_object(random_states)
        random_states = {**random_states, "random_states_by_rank": by_rank}
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "hooktrain_version": __version__,
        "plugin_list": list(trainer.plugin_names),
        "plugin_versions": {
            name: installed[name] for name in trainer.plugin_names if name in installed
        },
        "model": model_state,
        "optimizers": optimizer_states,
        "lr_schedulers": [entry.scheduler.state_dict() for entry in trainer._schedulers],
        "configured_lrs": trainer._configured_lrs,
        "progress": {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "epoch_batches_done": trainer.epoch_batches_done,
            "epoch_complete": trainer.epoch_complete,
            # How the epoch was split: a resume in its middle skips the first
            # epoch_batches_done, which only fits a loader that splits alike.
            **(trainer._resume_split or epoch_split(trainer, trainer.num_training_batches)),
            # A validation inside this step (val_every_n_steps) saw the weights saved:
            # the epoch's end, when a resume runs it, does not validate them again.
            "validated_at_step": trainer._validated_at_step,
            # What the epoch's validations computed, which its epoch-wise plateau
            # schedulers are judged on.
            "epoch_validation": (
                None if trainer._epoch_validation is None else sorted(trainer._epoch_validation)
            ),
        },
        "data_seed": trainer.data_seed,
        **random_states,
        # At an epoch's end, where the loader's own generators start the next epoch:
        # a resumed run's fresh loader would otherwise replay the first epoch's order.
        # Also before an epoch's iterator is made (on_train_epoch_start), which
        # draws from them.
        "next_epoch_generators": (
            None
            if epoch_start is not None
            else trainer._pending_generators
            or [g.get_state() for g in loader_generators(trainer.train_dataloader)]
        ),
        "metrics": trainer.metrics.floats(),
        # Collectives with several processes: the sums and metric states of every
        # process combined, so that a resume mid-epoch, on any number of processes,
        # ends the epoch with its whole-epoch values.
        "running_means": running_means,
        "epoch_metrics": (
            trainer._train_metrics.state_dict(collectives)
            if mid_epoch and trainer._train_metrics is not None
            else {}
        ),
        "plugins": {},
    }
    trainer.plugin_manager.hook.on_save_checkpoint(trainer=trainer, checkpoint=checkpoint)
    require_loadable(checkpoint)
    return checkpoint


def _state_dicts(trainer: Trainer) -> tuple[Mapping[str, Any], list[Any]]:
    """``get_state_dict``'s result, checked: a checkpoint without the model in it
    would be found out only by the resume that needs it."""
    result = trainer.plugin_manager.hook.get_state_dict(trainer=trainer)
    if (
        isinstance(result, tuple | list)
        and len(result) == 2
        and isinstance(result[0], Mapping)
        and isinstance(result[1], list | tuple)
        and len(result[1]) == len(trainer.optimizers)
    ):
        return result[0], list(result[1])
    from hooktrain.results import unexpected_result

    raise unexpected_result(
        trainer.plugin_manager,
        "get_state_dict",
        result,
        f"a pair (model state dict, list of {len(trainer.optimizers)} optimizer state dicts)",
    )


def require_checkpoint(loaded: Any, source: str) -> None:
    """Refuse what was loaded from ``source`` unless it is a checkpoint `dump_checkpoint`
    could have written: a bare ``state_dict``, or another trainer's file, would
    otherwise fail on its first missing key.

    :raises ConfigurationError: when ``loaded`` is not a mapping holding ``"model"``
        and ``"progress"``.
    """
    if not isinstance(loaded, Mapping) or "model" not in loaded or "progress" not in loaded:
        raise ConfigurationError(
            f"{source!r} is not a hooktrain checkpoint (expected a mapping with "
            f"'model' and 'progress', got {type(loaded).__name__}); load a model's "
            f"weights with model.load_state_dict(torch.load(path)) before fit instead"
        )


def check_loaded(trainer: Trainer, loaded: Any) -> None:
    """Refuse what a plugin's ``load_checkpoint`` returned unless it is ``None``,
    an empty mapping (start fresh) or a checkpoint, naming the plugins.

    :raises PluginError: for anything else (a bare ``state_dict``, a list).
    """
    if loaded is None or (
        isinstance(loaded, Mapping) and (not loaded or ("model" in loaded and "progress" in loaded))
    ):
        return
    raise unexpected_result(
        trainer.plugin_manager,
        "load_checkpoint",
        loaded,
        "a checkpoint (a mapping holding 'model' and 'progress', as dump_checkpoint "
        "makes it), an empty mapping or None",
    )


def restore_checkpoint(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """See `hooktrain.Trainer.restore_checkpoint`."""
    if trainer.module is None:
        raise ConfigurationError("restore_checkpoint() needs a model: call it during fit")
    schedulers = [entry.scheduler for entry in trainer._schedulers]
    scheduler_states = list(checkpoint.get("lr_schedulers", []))
    # Checked before anything loads, so that a refused resume leaves the model as
    # it was given.
    with _another_model_first(trainer.module, checkpoint["model"]):
        check_count("LR scheduler(s)", schedulers, scheduler_states)
        for index, (scheduler, saved) in enumerate(zip(schedulers, scheduler_states, strict=True)):
            check_scheduler_kind(index, scheduler, saved)
    loaded = trainer.plugin_manager.hook.set_state_dict(
        trainer=trainer,
        model_state_dict=checkpoint["model"],
        optimizer_state_dicts=list(checkpoint.get("optimizers", [])),
    )
    if loaded is not True:
        # Another value (load_state_dict's result, returned on) ends the hook
        # before the core's default: the optimizers would silently stay fresh.
        raise unexpected_result(trainer.plugin_manager, "set_state_dict", loaded, "True")
    warn_if_learning_rate_changed(trainer._configured_lrs, checkpoint.get("configured_lrs"))
    for scheduler, saved in zip(schedulers, scheduler_states, strict=True):
        scheduler.load_state_dict(saved)
    by_rank = checkpoint.get("random_states_by_rank")
    # Saved by as many processes: each takes its own; otherwise every one rank 0's.
    own_random = (
        by_rank[trainer.global_rank]
        if by_rank and len(by_rank) == trainer.world_size
        else checkpoint
    )
    progress = checkpoint["progress"]
    trainer.global_step = int(progress["global_step"])
    trainer.current_epoch = int(progress["epoch"])
    trainer.num_training_batches = progress.get("epoch_batches")  # until an epoch opens
    if progress["epoch_complete"]:
        # Where the checkpoint was, at the epoch's end: the loop goes on with the next
        # epoch, if there is one, and a fit with none left leaves progress as it is.
        trainer.epoch_complete = True
        trainer.epoch_batches_done = int(progress["epoch_batches_done"])
        trainer._resume_skip = 0
    else:
        trainer.epoch_batches_done = trainer._resume_skip = int(progress["epoch_batches_done"])
        rank = trainer.global_rank
        trainer._train_means.load_state_dict(
            checkpoint.get("running_means", {}), trainer.device, rank=rank
        )
        if trainer._train_metrics is not None:
            metric_states = checkpoint.get("epoch_metrics", {})
            trainer._train_metrics.load_state_dict(metric_states, rank=rank)
        trainer._pending_epoch_data = own_random.get("epoch_start_state")
        trainer._resume_split = {key: progress.get(key) for key in SPLIT}
        trainer._validated_at_step = int(progress.get("validated_at_step", -1))
        names = progress.get("epoch_validation")
        if "epoch_validation" not in progress and trainer._validated_at_step == trainer.global_step:
            # Written by an earlier hooktrain, which kept only the names of the
            # validation at the saved step.
            names = progress.get("last_validation")
        trainer._epoch_validation = None if names is None else set(names)
    trainer._pending_generators = checkpoint.get("next_epoch_generators")
    trainer.data_seed = int(checkpoint.get("data_seed", trainer.data_seed))
    trainer.metrics.update_raw(checkpoint.get("metrics", {}))
    trainer._checked_steps_from = trainer.global_step + 1
    trainer._pending_rng = own_random.get("rng")
    if not _finished(trainer):
        warn_if_workers_persist(trainer.train_dataloader)
    trainer.plugin_manager.hook.on_load_checkpoint(trainer=trainer, checkpoint=checkpoint)
    not_restored = sorted(set(checkpoint.get("plugins", {})) - set(trainer.plugin_names))
    if not_restored:
        print(
            f"hooktrain: the checkpoint holds state of plugins not selected now, not "
            f"restored: {', '.join(not_restored)}",
            file=sys.stderr,
        )


def _finished(trainer: Trainer) -> bool:
    """Whether the restored run has nothing left to train."""
    if not trainer.epoch_complete:
        return False
    steps_done = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
    return steps_done or trainer.current_epoch + 1 >= trainer.max_epochs


def check_count(what: str, objects: list[Any], states: list[Any]) -> None:
    """:raises ConfigurationError: when the checkpoint holds another number of ``what``."""
    if len(states) != len(objects):
        raise ConfigurationError(
            f"the checkpoint holds {len(states)} {what}, the run has {len(objects)}"
        )


def load_model_and_optimizers(
    trainer: Trainer, model_state: Mapping[str, Any], optimizer_states: list[Any]
) -> None:
    """The core's ``set_state_dict``: `load_model_state`, then each optimizer's state
    (their number and classes checked before anything loads).

    An optimizer state keyed by parameter name (the form of
    ``torch.distributed.checkpoint.state_dict``, which sharded checkpoints hold) is
    loaded with ``set_optimizer_state_dict``; one keyed by position with the
    optimizer's own ``load_state_dict``.

    :raises ConfigurationError: from `load_model_state`, for another number of
        optimizers, or for an optimizer state saved by another optimizer class.
    """
    with _another_model_first(trainer.module, model_state):
        check_count("optimizer(s)", trainer.optimizers, optimizer_states)
        for index, (optimizer, saved) in enumerate(
            zip(trainer.optimizers, optimizer_states, strict=True)
        ):
            check_optimizer_kind(index, optimizer, saved)
    load_model_state(trainer.module, model_state)
    for optimizer, saved in zip(trainer.optimizers, optimizer_states, strict=True):
        if any(isinstance(key, str) for key in saved.get("state", {})) or any(
            isinstance(p, str) for group in saved.get("param_groups", []) for p in group["params"]
        ):
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(trainer.module, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)


def check_optimizer_kind(index: int, optimizer: Any, saved: Mapping[str, Any]) -> None:
    """Refuse an optimizer state (``saved``, a ``state_dict`` of either form) saved
    by another optimizer class than ``optimizer``, the run's ``index``-th.

    torch loads one without a word, keeping the saved settings, and the first step
    then fails inside the optimizer (SGD after Adam: ``KeyError: 'momentum'``). The
    test: the saved parameter group lacks some of ``optimizer.defaults`` (the
    class's own settings) and holds settings the run's group has not. Both sides
    count, because settings that torch adds between versions, or that an LR
    scheduler adds to the groups (``initial_lr``, OneCycleLR's ``max_lr``), differ
    one way only. Adam and AdamW share their settings: torch loads one into the
    other, keeping the saved ``decoupled_weight_decay``.

    :raises ConfigurationError: naming the settings on each side.
    """
    saved_groups, own_groups = saved.get("param_groups") or [{}], optimizer.param_groups
    saved_keys, own_keys = set(saved_groups[0]) - {"params"}, set(own_groups[0]) - {"params"}
    missing = set(getattr(optimizer, "defaults", own_keys)) - saved_keys
    # A wrapper (accelerate's AcceleratedOptimizer) holds the user's as .optimizer.
    kind = type(getattr(optimizer, "optimizer", optimizer)).__name__
    _refuse_another_kind("optimizer", index, kind, "settings", saved_keys - own_keys, missing)


def check_scheduler_kind(index: int, scheduler: Any, saved: Mapping[str, Any]) -> None:
    """Refuse an LR scheduler state (``saved``) saved by another scheduler class than
    ``scheduler``, the run's ``index``-th.

    torch's ``load_state_dict`` copies the saved attributes over the scheduler's
    own: a StepLR's state in a CosineAnnealingLR loads without a word and mixes
    the two; some classes fail later with a bare ``KeyError`` (CyclicLR:
    ``'_scale_fn_custom'``). The test, as for optimizers (`check_optimizer_kind`):
    the saved state holds attributes the run's scheduler has not, and lacks some
    it has. Either alone is what another torch version gives (it adds attributes
    such as ``_is_initial``). Classes whose state is a subset of another's
    (ExponentialLR's of StepLR's) are not told apart.

    :raises ConfigurationError: naming the attributes on each side.
    """
    own, kept = set(scheduler.state_dict()), set(saved)
    # A wrapper (accelerate's AcceleratedScheduler) holds the user's as .scheduler.
    kind = type(getattr(scheduler, "scheduler", scheduler)).__name__
    _refuse_another_kind("LR scheduler", index, kind, "attributes", kept - own, own - kept)


def _refuse_another_kind(
    what: str, index: int, kind: str, noun: str, unknown: set[str], missing: set[str]
) -> None:
    """:raises ConfigurationError: when the saved state of the run's ``index``-th
    ``what`` (of class ``kind``) has ``noun`` it lacks (``unknown``) and lacks some
    it has (``missing``)."""
    if unknown and missing:
        raise ConfigurationError(
            f"the checkpoint's {what} {index} was saved by another kind of {what} than "
            f"this run's {kind}: its {noun} include {', '.join(sorted(unknown))}, which "
            f"{kind} has not, and lack {', '.join(sorted(missing))}. Resume with the {what} "
            f"it was saved with"
        )


def load_model_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """``module.load_state_dict(state)``, after checking that every key and shape
    fits.

    A state taken from ``torch.compile``'s wrapper instead of the module inside it
    (every key prefixed with ``_orig_mod.``, as hooktrain wrote them before it
    unwrapped compiled models) is loaded without the prefix.

    :raises ConfigurationError: listing missing keys, unexpected keys and shape
        mismatches together.
    """
    module.load_state_dict(_fitting_state(module, state))


def _fitting_state(module: nn.Module, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` as ``module`` loads it (see `load_model_state`), changing nothing.

    :raises ConfigurationError: when its keys or shapes are another model's.
    """
    own = module.state_dict()
    if (
        state
        and all(key.startswith(_COMPILED_PREFIX) for key in state)
        and not any(key.startswith(_COMPILED_PREFIX) for key in own)
    ):
        state = {key[len(_COMPILED_PREFIX) :]: value for key, value in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append("missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            lines.append("not in the model: " + ", ".join(unexpected))
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched))
        raise ConfigurationError(
            f"the checkpoint does not fit {type(module).__name__}:\n  " + "\n  ".join(lines)
        )
    return state


@contextlib.contextmanager
def _another_model_first(module: Any, state: Mapping[str, Any]) -> Iterator[None]:
    """When a check inside refuses the checkpoint (its optimizer or scheduler count
    or class), refuse it instead for being another model's when it is: its keys and
    shapes say what is wrong better than the counts that follow from them."""
    try:
        yield
    except ConfigurationError:
        _fitting_state(module, state)  # raises the model's mismatch, if any
        raise
