"""A training step's loss: found in what the step returned, and checked before
backward (a scalar that requires grad; with ``check_finite_every_step``, finite on
every process).

:raises ConfigurationError: from `loss_of` and `raise_bad_loss`, naming the plugin
    whose ``forward_step`` returned it, if not the core.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import ConfigurationError
from hooktrain.results import origin

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["agreed_finite", "loss_of", "raise_bad_loss"]


def agreed_finite(trainer: Trainer, finite: torch.Tensor | None) -> bool | None:
    """This process's finiteness check (a boolean tensor of one element, or ``None``
    when it had nothing to check), agreed over the processes: with several, one
    ``all_reduce``, so that all stop at the same point, or one raising alone would
    leave the others waiting in their next collective. :return: ``False`` when some
    process found a non-finite value, else ``None`` when this one had nothing to
    check, else ``True``."""
    if trainer.world_size > 1:
        bad = torch.zeros(1, device=trainer.device) if finite is None else (~finite).reshape(1)
        if trainer.all_reduce(bad.to(torch.float32)).item() > 0:
            return False
    return None if finite is None else bool(finite)


def loss_of(outputs: Any, trainer: Trainer) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):  # a subclass of Tensor
        return outputs
    source = origin(trainer.plugin_manager, "forward_step")
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
        if isinstance(loss, torch.Tensor):
            return loss
        # The core's own step puts loss_fn's result there: name both places.
        raise ConfigurationError(
            f"the training loss must be a tensor, got {type(loss).__name__} "
            f"{reprlib.repr(loss)}: what loss_fn returned, or the 'loss' of what the "
            f"training_step returned{source}"
        )
    if isinstance(outputs, Mapping):
        keys = ", ".join(repr(key) for key in outputs) or "none"
        raise ConfigurationError(
            f"the training step returned a dict without 'loss' (its keys: {keys}); "
            f"return the loss tensor, or a dict holding it under 'loss'{source}"
        )
    raise ConfigurationError(
        f"the training step must return the loss tensor or a dict holding 'loss', "
        f"got {type(outputs).__name__}{source}"
    )


def raise_bad_loss(loss: torch.Tensor, trainer: Trainer) -> None:
    source = origin(trainer.plugin_manager, "forward_step")
    if loss.ndim != 0:
        raise ConfigurationError(
            f"the loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; "
            f"reduce it (reduction='mean') before returning it{source}"
        )
    raise ConfigurationError(
        "the loss does not require grad: it was detached, computed under torch.no_grad(), "
        f"or the model's parameters do not take part in it{source}"
    )
