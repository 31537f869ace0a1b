"""Finding, loading and registering plugins.

A plugin is selected by one of:

* an entry-point name in the group ``hooktrain`` (``"tqdm"``);
* an import path, ``"package.module:attribute"`` or ``"package.module"``;
* an object: an instance or a module holding hook implementations, or a class
  (constructed with no arguments);
* a pair ``(any of the above, {options})``: the target is a class or factory and is
  called with the options as keyword arguments.

Only selected plugins are imported. Listing what is installed reads package
metadata alone (`installed_plugins`), so it stays fast and survives broken
plugins.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from hooktrain import hookspecs
from hooktrain.errors import PluginError
from hooktrain.markers import PROJECT_NAME

ENTRY_POINT_GROUP = "hooktrain"
#: Entry points that add subcommands to the ``hooktrain`` command line.
COMMAND_ENTRY_POINT_GROUP = "hooktrain.commands"
#: Comma-separated plugin names that are skipped (and never imported) even when selected.
DISABLE_ENV = "HOOKTRAIN_DISABLE_PLUGINS"
#: The plugins ``Trainer(plugins=None)`` selects, each only when installed.
DEFAULT_PLUGINS: tuple[str, ...] = ("tqdm",)

PluginSelection = str | object | tuple[Any, Mapping[str, Any]]


@dataclass(frozen=True)
class InstalledPlugin:
    """One entry point of the group ``hooktrain``, read from package metadata."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> Any:
        module_name, _, attribute = self.value.partition(":")
        try:
            target: Any = importlib.import_module(module_name.strip())
            for part in filter(None, attribute.strip().split(".")):
                target = getattr(target, part)
        except Exception as exc:
            raise PluginError(
                f"plugin {self.name!r} from distribution {self.distribution} {self.version} "
                f"failed to load ({self.value}): {type(exc).__name__}: {exc}"
            ) from exc
        return target


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin installed in this environment, by entry-point name.

    Reads metadata only: nothing is imported. When two distributions claim one
    name, the first found wins, as ``importlib.metadata`` orders them.
    """
    found: dict[str, InstalledPlugin] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in found:
            continue
        dist = entry_point.dist
        found[entry_point.name] = InstalledPlugin(
            name=entry_point.name,
            value=entry_point.value,
            distribution=dist.name if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        )
    return found


def disabled_plugin_names() -> set[str]:
    """Names listed in ``HOOKTRAIN_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _import_path(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            target = getattr(target, part)
    except Exception as exc:
        raise PluginError(
            f"plugin {path!r} could not be imported: {type(exc).__name__}: {exc}"
        ) from exc
    return target


def _instantiate(name: str, target: Any, options: Mapping[str, Any] | None) -> Any:
    """Turn what a selection points to into a registrable plugin object."""
    is_factory = inspect.isclass(target) or (
        inspect.isfunction(target) and not _has_hookimpls(target)
    )
    if is_factory:
        try:
            return target(**(options or {}))
        except TypeError as exc:
            raise PluginError(
                f"plugin {name!r}: cannot be constructed with options {dict(options or {})}: {exc}"
            ) from exc
    if options:
        kind = "a module" if isinstance(target, types.ModuleType) else "an object"
        raise PluginError(
            f"plugin {name!r} is {kind}, not a class or factory, so it takes no options "
            f"(got {sorted(options)})"
        )
    return target


def _has_hookimpls(obj: Any) -> bool:
    return hasattr(obj, PROJECT_NAME + "_impl")


def _object_name(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    declared = getattr(obj, "name", None)
    if isinstance(declared, str) and declared:
        return declared
    return type(obj).__name__


def resolve_plugins(selection: Sequence[PluginSelection] | None) -> list[tuple[str, Any]]:
    """Load every selected plugin and return ``(name, plugin object)`` in list order.

    :raises PluginError: for an unknown name (listing what is installed and the
        closest match), a plugin that fails to import (naming its distribution),
        bad options, or a malformed entry.
    """
    installed: dict[str, InstalledPlugin] | None = None
    disabled = disabled_plugin_names()
    if selection is None:
        installed = installed_plugins()
        selection = [name for name in DEFAULT_PLUGINS if name in installed]

    loaded: list[tuple[str, Any]] = []
    for item in selection:
        options: Mapping[str, Any] | None = None
        target = item
        if isinstance(item, tuple):
            if len(item) != 2 or not isinstance(item[1], Mapping):
                raise PluginError(
                    f"plugin entry {item!r} must be a pair (name or object, {{options}})"
                )
            target, options = item
        if isinstance(target, str):
            name = target
            if name in disabled:
                print(
                    f"hooktrain: plugin {name!r} is disabled by {DISABLE_ENV}; running without it",
                    file=sys.stderr,
                )
                continue
            if ":" in name:
                obj = _import_path(name)
            else:
                if installed is None:
                    installed = installed_plugins()
                if name in installed:
                    obj = installed[name].load()
                elif "." in name:
                    obj = _import_path(name)
                else:
                    closest = _closest(name, installed)
                    hint = f" Did you mean {closest!r}?" if closest else ""
                    known = ", ".join(sorted(installed)) or "none"
                    raise PluginError(
                        f"unknown plugin {name!r}.{hint} Installed plugins: {known}. "
                        f"Install a distribution that registers it under the entry-point "
                        f"group {ENTRY_POINT_GROUP!r}, or pass an import path 'module:attribute'."
                    )
            loaded.append((name, _instantiate(name, obj, options)))
        else:
            name = target.__name__ if inspect.isclass(target) else _object_name(target)
            if name in disabled:
                print(
                    f"hooktrain: plugin {name!r} is disabled by {DISABLE_ENV}; running without it",
                    file=sys.stderr,
                )
                continue
            obj = _instantiate(name, target, options)
            loaded.append((_object_name(obj) if inspect.isclass(target) else name, obj))
    return _unique_names(loaded)


def _unique_names(loaded: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    result = []
    for name, obj in loaded:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append((name if count == 0 else f"{name}-{count + 1}", obj))
    return result


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for the project ``hooktrain``, stricter on registration.

    A hook implementation whose name matches no hookspec is refused at once
    (pluggy would accept it silently until ``check_pending``), naming the plugin,
    the bad name and the closest hook; an argument a hook does not offer is refused
    the same way.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        name = name or _object_name(plugin)
        spec_names = [n for n in dir(self.hook) if not n.startswith("_")]
        for attr in dir(plugin):
            if attr.startswith("__"):
                continue
            if self.parse_hookimpl_opts(plugin, attr) is None:
                continue
            if not hasattr(self.hook, attr):
                closest = _closest(attr, spec_names)
                hint = f"; did you mean {closest!r}?" if closest else ""
                raise PluginError(
                    f"plugin {name!r} implements {attr!r}, which is not a hooktrain hook{hint} "
                    f"(see 'hooktrain plugins --hooks' for the list)"
                )
            offered = list(inspect.signature(getattr(hookspecs, attr)).parameters)
            try:
                wanted = [
                    p.name
                    for p in inspect.signature(getattr(plugin, attr)).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
            except (TypeError, ValueError):
                continue
            unknown = [arg for arg in wanted if arg not in offered]
            if unknown:
                raise PluginError(
                    f"plugin {name!r}: its {attr} takes {', '.join(unknown)}, which the hook "
                    f"does not offer; {attr} offers ({', '.join(offered)})"
                )
        try:
            return super().register(plugin, name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc
