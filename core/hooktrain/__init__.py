"""hooktrain: a PyTorch trainer whose every phase is a pluggy hook.

``import hooktrain`` is cheap: the markers load at once, and the trainer (which
needs torch) loads on first use, so ``hooktrain plugins`` answers without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hooktrain.markers import hookimpl, hookspec

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hooktrain.errors import (
        ConfigurationError,
        HookError,
        HooktrainError,
        NonFiniteLossError,
        PluginError,
        ResumeWarning,
    )
    from hooktrain.metrics import accuracy
    from hooktrain.rng import seed_everything
    from hooktrain.trainer import Trainer

_LAZY = {
    "Trainer": "hooktrain.trainer",
    "seed_everything": "hooktrain.rng",
    "accuracy": "hooktrain.metrics",
    "HooktrainError": "hooktrain.errors",
    "ConfigurationError": "hooktrain.errors",
    "HookError": "hooktrain.errors",
    "PluginError": "hooktrain.errors",
    "NonFiniteLossError": "hooktrain.errors",
    "ResumeWarning": "hooktrain.errors",
}

__all__ = [
    "ConfigurationError",
    "HookError",
    "HooktrainError",
    "NonFiniteLossError",
    "PluginError",
    "ResumeWarning",
    "Trainer",
    "__version__",
    "accuracy",
    "hookimpl",
    "hookspec",
    "seed_everything",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hooktrain' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
