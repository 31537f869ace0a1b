"""A training step's loss: found in what the step returned, and checked before
backward (a scalar that requires grad; with ``check_finite_every_step``, finite on
every process).

:raises ConfigurationError: from `loss_of` and `raise_bad_loss`, naming the plugin
    whose ``forward_step`` returned it, if not the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import ConfigurationError
from hooktrain.results import origin

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["finite_everywhere", "loss_of", "raise_bad_loss"]


def finite_everywhere(trainer: Trainer, loss: torch.Tensor, processes: int) -> bool:
    """Whether ``loss`` is finite on every process: they agree (one ``all_reduce``),
    so that all stop at the same step, or one raising alone would leave the others
    waiting in their next collective."""
    finite = torch.isfinite(loss)
    if processes == 1:
        return bool(finite)
    return trainer.all_reduce((~finite).reshape(1).to(torch.float32)).item() == 0


def loss_of(outputs: Any, trainer: Trainer) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):  # a subclass of Tensor
        return outputs
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
        if isinstance(loss, torch.Tensor):
            return loss
    raise ConfigurationError(
        f"the training step must return the loss tensor or a dict holding 'loss', "
        f"got {type(outputs).__name__}{origin(trainer.plugin_manager, 'forward_step')}"
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
