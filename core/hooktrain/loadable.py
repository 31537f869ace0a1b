"""Whether a checkpoint can be read back by ``torch.load(weights_only=True)``.

Every checkpoint is loaded that way, so that resuming never runs pickled code.
A value it refuses (a NumPy number, a ``Path``, an object of a plugin's own class)
is found here, when the checkpoint is made, rather than by the resume that needs
it, after every checkpoint of the run was written with it.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from hooktrain.errors import ConfigurationError, PluginError

__all__ = ["require_loadable"]

#: Values ``torch.load(weights_only=True)`` reads without being asked: anything else
#: is tried on its own (`_loads_safely`).
_PLAIN = frozenset({int, float, bool, str, bytes, complex, type(None)})


def require_loadable(checkpoint: Mapping[str, Any]) -> None:
    """Refuse, while saving, a checkpoint that ``torch.load(weights_only=True)``
    would refuse to resume from: a NumPy number, a ``Path`` or an object of a
    plugin's own class in it makes every checkpoint of the run unusable.

    :raises PluginError: naming the plugin, for a value under ``checkpoint["plugins"]``.
    :raises ConfigurationError: for one anywhere else (a scheduler's state...).
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(checkpoint, ())]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind in _PLAIN or isinstance(value, torch.Tensor):
            continue
        if kind is dict or kind is OrderedDict:
            for key, item in value.items():
                stack.append((key, (*path, "<key>")))
                stack.append((item, (*path, key)))
        elif kind is list or kind is tuple:
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif not _loads_safely(value):
            _raise_unloadable(kind, path)


def _loads_safely(value: Any) -> bool:
    """Whether ``value`` survives ``torch.save`` and ``torch.load(weights_only=True)``
    (a ``torch.Size`` or ``torch.dtype`` does; so does what the user allowed with
    ``torch.serialization.add_safe_globals``)."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def _raise_unloadable(kind: type, path: tuple[Any, ...]) -> NoReturn:
    where = "checkpoint" + "".join(f"[{part!r}]" for part in path)
    advice = (
        "torch.load(weights_only=True) refuses it, so no checkpoint of this run could be "
        "resumed from. Store numbers, strings, tensors, lists and dicts (a NumPy value: "
        "its .item() or torch.from_numpy(...); a Path: str(path))"
    )
    described = f"{kind.__module__}.{kind.__qualname__}"
    if len(path) >= 2 and path[0] == "plugins":
        raise PluginError(
            f"plugin {path[1]!r} put a {described} at {where} in on_save_checkpoint; {advice}"
        )
    raise ConfigurationError(f"the checkpoint holds a {described} at {where}; {advice}")
