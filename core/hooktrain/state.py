"""What a checkpoint holds, and putting a run back where one was taken.

A checkpoint is a mapping of tensors, numbers, strings, lists and dicts, so that
``torch.load(weights_only=True)`` reads it without running pickled code. The
format is described in ``docs/checkpointing.md``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hooktrain.errors import ConfigurationError
from hooktrain.metrics import process_collectives
from hooktrain.rng import rng_state

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["dump_checkpoint", "restore_checkpoint"]

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
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "hooktrain_version": __version__,
        "plugin_list": list(trainer.plugin_names),
        "plugin_versions": {
            name: installed[name] for name in trainer.plugin_names if name in installed
        },
        "model": trainer.module.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "lr_schedulers": [entry.scheduler.state_dict() for entry in trainer._schedulers],
        "progress": {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "epoch_batches_done": trainer.epoch_batches_done,
            "epoch_complete": trainer.epoch_complete,
        },
        "data_seed": trainer.data_seed,
        "rng": rng_state(),
        # What decided the current epoch's data: a resume in its middle replays it.
        "epoch_start_state": trainer._epoch_start_state,
        "metrics": trainer.metrics.floats(),
        "running_means": _per_process(trainer, trainer._train_means.state_dict()),
        "epoch_metrics": (
            _per_process(trainer, trainer._train_metrics.state_dict())
            if trainer._train_metrics
            else []
        ),
        "plugins": {},
    }
    trainer.plugin_manager.hook.on_save_checkpoint(trainer=trainer, checkpoint=checkpoint)
    return checkpoint


def restore_checkpoint(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """See `hooktrain.Trainer.restore_checkpoint`."""
    if trainer.module is None:
        raise ConfigurationError("restore_checkpoint() needs a model: call it during fit")
    load_model_state(trainer.module, checkpoint["model"])
    _load_each("optimizer(s)", trainer.optimizers, checkpoint.get("optimizers", []))
    _load_each(
        "LR scheduler(s)",
        [entry.scheduler for entry in trainer._schedulers],
        checkpoint.get("lr_schedulers", []),
    )
    progress = checkpoint["progress"]
    trainer.global_step = int(progress["global_step"])
    if progress["epoch_complete"]:
        trainer.current_epoch = int(progress["epoch"]) + 1
        trainer._resume_skip = 0
    else:
        trainer.current_epoch = int(progress["epoch"])
        trainer._resume_skip = int(progress["epoch_batches_done"])
        means = _own_state(trainer, checkpoint.get("running_means", []), "running means")
        trainer._train_means.load_state_dict(means or {}, trainer.device)
        metric_states = _own_state(trainer, checkpoint.get("epoch_metrics", []), "metric states")
        if trainer._train_metrics and metric_states is not None:
            trainer._train_metrics.load_state_dict(metric_states)
        trainer._pending_epoch_data = checkpoint.get("epoch_start_state")
    trainer.data_seed = int(checkpoint.get("data_seed", trainer.data_seed))
    trainer.metrics.update_raw(checkpoint.get("metrics", {}))
    trainer._checked_steps_from = trainer.global_step + 1
    trainer._pending_rng = checkpoint.get("rng")
    trainer.plugin_manager.hook.on_load_checkpoint(trainer=trainer, checkpoint=checkpoint)
    not_restored = sorted(set(checkpoint.get("plugins", {})) - set(trainer.plugin_names))
    if not_restored:
        print(
            f"hooktrain: the checkpoint holds state of plugins not selected now, not "
            f"restored: {', '.join(not_restored)}",
            file=sys.stderr,
        )


def _per_process(trainer: Trainer, state: Any) -> list[Any]:
    """``state`` of every process, in rank order. The running means and stateful
    metrics of an epoch in progress are each process's own (its batches); with
    several processes this gathers them, so every process must build the checkpoint
    at the same point (the checkpoint plugin does)."""
    collectives = process_collectives(trainer)
    return [state] if collectives is None else collectives.all_gather_object(state)


def _own_state(trainer: Trainer, states: Any, what: str) -> Any:
    """This process's entry of a per-process list (``None`` when there is none to
    load). A single mapping is an older checkpoint's: every process loads it."""
    if isinstance(states, Mapping):
        return states
    if not states:
        return None
    if len(states) != trainer.world_size:
        warnings.warn(
            f"hooktrain: the checkpoint holds the epoch's {what} of {len(states)} "
            f"process(es), the run has {trainer.world_size}: the resumed epoch's values "
            f"cover only the batches after the resume",
            stacklevel=4,
        )
        return None
    return states[trainer.global_rank]


def _load_each(what: str, objects: list[Any], states: list[Any]) -> None:
    if len(states) != len(objects):
        raise ConfigurationError(
            f"the checkpoint holds {len(states)} {what}, the run has {len(objects)}"
        )
    for obj, state in zip(objects, states, strict=True):
        obj.load_state_dict(state)


def load_model_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """``module.load_state_dict(state)``, after checking that every key and shape
    fits.

    A state taken from ``torch.compile``'s wrapper instead of the module inside it
    (every key prefixed with ``_orig_mod.``, as hooktrain wrote them before it
    unwrapped compiled models) is loaded without the prefix.

    :raises ConfigurationError: listing missing keys, unexpected keys and shape
        mismatches together.
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
    module.load_state_dict(state)
