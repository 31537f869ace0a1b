"""The `Trainer`'s options: checked when it is built, before any work is done, and
recorded as the run's hyperparameters for loggers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["check_options", "default_device", "trainer_hparams"]

# The option that sets each stage's ``trainer.limits`` entry.
_LIMIT_OPTIONS = {
    "train": "limit_train_batches",
    "validate": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}


def check_options(
    *,
    plugins: Any,
    max_epochs: Any,
    max_steps: Any,
    accumulate_grad_batches: Any,
    gradient_clip_val: Any,
    check_val_every_n_epoch: Any,
    val_every_n_steps: Any,
    limits: Mapping[str, Any],
    log_every_n_steps: Any,
) -> None:
    """Refuse options that cannot run, before anything else happens.

    :param limits: the ``limit_*_batches`` options, by stage (``"train"``,
        ``"validate"``, ``"test"``, ``"predict"``).
    :raises ConfigurationError: for a count that is not an integer in its range
        (``max_epochs``, ``accumulate_grad_batches``, ``check_val_every_n_epoch`` and
        ``log_every_n_steps`` >= 1; ``max_steps`` and ``val_every_n_steps`` >= 1 or
        ``None``; each limit >= 0 or ``None``), a ``gradient_clip_val`` not > 0, or
        ``plugins`` that is not a list.
    """
    _require_int("max_epochs", max_epochs, minimum=1)
    _require_int("max_steps", max_steps, minimum=1, optional=True)
    _require_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
    _require_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
    _require_int("val_every_n_steps", val_every_n_steps, minimum=1, optional=True)
    _require_int("log_every_n_steps", log_every_n_steps, minimum=1)
    for stage, value in limits.items():
        _require_int(_LIMIT_OPTIONS[stage], value, minimum=0, optional=True)
    if gradient_clip_val is not None and not gradient_clip_val > 0:
        raise ConfigurationError(f"gradient_clip_val must be > 0, got {gradient_clip_val!r}")
    if plugins is not None and (
        isinstance(plugins, str | bytes) or not isinstance(plugins, Sequence)
    ):
        raise ConfigurationError(
            f"plugins must be a list (of names, objects or (name, options) pairs), got {plugins!r}"
        )


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def trainer_hparams(trainer: Trainer) -> dict[str, Any]:
    """``trainer``'s settings and plugin list, for loggers to record."""
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "seed": trainer.seed,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "val_every_n_steps": trainer.val_every_n_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
        "limit_train_batches": trainer.limits["train"],
        "limit_val_batches": trainer.limits["validate"],
        "device": str(trainer.device),
        "world_size": trainer.world_size,
        "plugins": list(trainer.plugin_names),
    }


def _require_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
