"""Loading a checkpoint's model and optimizer states into a sharded model, whatever
form they were saved in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError
from hooktrain.state import check_count, check_optimizer_kind

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hooktrain import Trainer

__all__ = ["load_into_sharded"]


def _is_sharded(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def load_into_sharded(
    trainer: Trainer, model_state: Mapping[str, Any], optimizer_states: Sequence[Any]
) -> None:
    """Load states into ``trainer.module`` (sharded) and ``trainer.optimizers``.

    ``DTensor`` values (a sharded checkpoint, read into this run's shards) load
    as they are; full tensors (a single-file checkpoint) are sharded on load, each
    process taking its part of its own copy. A positional optimizer state (from
    ``optimizer.state_dict()``) is first keyed by parameter name, in the order this
    run's optimizer holds the parameters.

    :raises ConfigurationError: for missing or unexpected keys, or another number
        of optimizers.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module = trainer.module
    own = set(dict(module.named_parameters())) | {name for name, _ in module.named_buffers()}
    missing = sorted(own - set(model_state))
    unexpected = sorted(set(model_state) - own)
    if missing or unexpected:
        raise ConfigurationError(
            f"the checkpoint does not fit {type(module).__name__}: missing from the "
            f"checkpoint: {', '.join(missing) or 'none'}; not in the model: "
            f"{', '.join(unexpected) or 'none'}"
        )
    check_count("optimizer(s)", trainer.optimizers, list(optimizer_states))
    for index, (optimizer, saved) in enumerate(
        zip(trainer.optimizers, optimizer_states, strict=True)
    ):
        check_optimizer_kind(index, optimizer, saved)
    full = not any(_is_sharded(v) for v in model_state.values())
    options = StateDictOptions(full_state_dict=full, strict=True)
    set_model_state_dict(module, dict(model_state), options=options)
    for optimizer, saved in zip(trainer.optimizers, optimizer_states, strict=True):
        keyed = _keyed_by_name(module, optimizer, saved)
        tensors = [v for s in keyed["state"].values() for v in s.values() if hasattr(v, "shape")]
        # An optimizer without tensor state (SGD without momentum) has nothing to
        # shard; loaded as a full state, DCP wanted a device to broadcast from.
        sharded = not tensors or any(_is_sharded(t) for t in tensors)
        set_optimizer_state_dict(
            module, optimizer, keyed, options=StateDictOptions(full_state_dict=not sharded)
        )


def _keyed_by_name(module: nn.Module, optimizer: torch.optim.Optimizer, saved: Any) -> Any:
    """``saved`` with its parameters named, when ``optimizer.state_dict()`` keyed
    them by position."""
    groups = saved.get("param_groups", [])
    if all(isinstance(p, str) for group in groups for p in group["params"]):
        return saved
    names = {p: name for name, p in module.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    positions = [p for group in groups for p in group["params"]]
    if len(positions) != len(order):
        raise ConfigurationError(
            f"the checkpoint's optimizer holds {len(positions)} parameters, this run's "
            f"{type(optimizer).__name__} holds {len(order)}"
        )
    by_position = dict(zip(positions, order, strict=True))
    return {
        "state": {by_position[k]: v for k, v in saved.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [by_position[p] for p in group["params"]]} for group in groups
        ],
    }
