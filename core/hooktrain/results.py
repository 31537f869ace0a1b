"""What a hook returned, checked.

A plugin's implementation of a compute hook gives the loop a value it goes on
with. One of the wrong kind (``return loss`` from ``backward``, a string of
metrics) would otherwise fail later, somewhere else, blaming the model or no one.
These checks name the plugins that implement the hook instead. They look at types
and lengths only: nothing is read from the device.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import ConfigurationError, PluginError

if TYPE_CHECKING:
    import pluggy

    from hooktrain.trainer import Trainer

__all__ = ["implementers", "iterate", "metric_values", "origin", "unexpected_result", "wrappers"]


def _one_number(value: Any) -> bool:
    """A number (NumPy's scalars too, what scikit-learn's metrics return) or a
    one-element tensor: one value per batch, which the epoch's mean can weigh. A
    tensor of one value per sample would be summed in as if it were one."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real)


def unexpected_result(
    plugin_manager: pluggy.PluginManager, hook_name: str, result: Any, expected: str
) -> PluginError:
    """The error for a compute hook whose result is none of the values its spec
    allows, naming the plugins that implement it: a value where ``True`` was meant
    (``return loss`` from ``backward``) would otherwise end the hook silently, the
    core's default never running."""
    names = [repr(name) for name in implementers(plugin_manager, hook_name)]
    wrapped = [repr(name) for name in wrappers(plugin_manager, hook_name)]
    around = (
        f", wrapped by {', '.join(wrapped)} (what a wrapper returns replaces the hook's "
        f"result: end it with `return (yield)` to pass that on)"
        if wrapped
        else ""
    )
    return PluginError(
        f"the {hook_name} hook returned {type(result).__name__} {result!r:.60}, which "
        f"is not {expected}; implemented by {', '.join(names) or 'the core alone'}{around}. An "
        f"implementation that only observes returns None, so that the next one (the "
        f"core's default last) still does the work"
    )


def origin(
    plugin_manager: pluggy.PluginManager, hook_name: str, instead_of: str = "the model's"
) -> str:
    """Words for an error about a value ``hook_name`` gave, naming the plugins that
    implement or wrap it (``""`` when only the core does): the value may be theirs,
    not ``instead_of``'s, whom the error would otherwise seem to blame."""
    parts = [
        f"{how} by {', '.join(map(repr, names))}"
        for how, names in (
            ("implemented", implementers(plugin_manager, hook_name)),
            ("wrapped", wrappers(plugin_manager, hook_name)),
        )
        if names
    ]
    if not parts:
        return ""
    by = " and ".join(parts)
    return f" ({hook_name} is {by}: the value may be theirs rather than {instead_of})"


def implementers(plugin_manager: pluggy.PluginManager, hook_name: str) -> list[str]:
    """The registered names of the plugins, the core left out, whose implementations
    of ``hook_name`` can give its result (wrappers only surround it), in registration
    order (pluggy calls them last first)."""
    return _names(plugin_manager, hook_name, wrapping=False)


def wrappers(plugin_manager: pluggy.PluginManager, hook_name: str) -> list[str]:
    """The registered names of the plugins, the core left out, that wrap ``hook_name``."""
    return _names(plugin_manager, hook_name, wrapping=True)


def _names(plugin_manager: pluggy.PluginManager, hook_name: str, *, wrapping: bool) -> list[str]:
    caller = getattr(plugin_manager.hook, hook_name)
    names = [
        plugin_manager.get_name(impl.plugin)
        for impl in caller.get_hookimpls()
        if bool(impl.wrapper or impl.hookwrapper) is wrapping
    ]
    return [name for name in names if name and name != "core"]


def iterate(plugin_manager: pluggy.PluginManager, hook_name: str, result: Any) -> Iterator[Any]:
    """``iter(result)`` for a hook that must return an iterable (``batch_iterator``).

    :raises PluginError: naming the implementers when ``result`` is not iterable.
    """
    try:
        return iter(result)
    except TypeError:
        raise unexpected_result(plugin_manager, hook_name, result, "an iterable") from None


def metric_values(trainer: Trainer, values: Any) -> Mapping[str, Any]:
    """``compute_metrics``'s result, checked: a mapping of names to numbers or
    one-element tensors (``None``: nothing computed).

    :raises PluginError: naming the implementers, for anything else from a plugin;
        a string there used to fail later, as a conversion error blaming no one.
    :raises ConfigurationError: for a value of the core's, which is what one of
        the ``metrics=`` functions returned.
    """
    if values is None:
        return {}
    if isinstance(values, Mapping):
        wrong = [name for name, value in values.items() if not _one_number(value)]
        if not wrong:
            return values
        if not implementers(trainer.plugin_manager, "compute_metrics"):
            value = values[wrong[0]]
            what = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else f"{type(value).__name__} {value!r:.60}"
            )
            raise ConfigurationError(
                f"metric {wrong[0]!r} returned {what}; a metric function returns a number "
                f"or a one-element tensor (reduce a value per sample, with .mean())"
            )
    raise unexpected_result(
        trainer.plugin_manager, "compute_metrics", values, "a dict of numbers or 0-dim tensors"
    )
