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

import dataclasses
import importlib
import inspect
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from hooktrain.errors import ConfigurationError, PluginError, closest_name, warn_user
from hooktrain.manager import PluginManager, object_name
from hooktrain.markers import PROJECT_NAME
from hooktrain.roles import (  # noqa: F401 - re-exported, where callers import them from
    ROLE_HINTS_ATTRIBUTE,
    ROLES_ATTRIBUTE,
    check_exclusive_roles,
    exclusive_roles,
    role_conflict,
)
from hooktrain.selection import (
    DISABLE_ENV,
    SCRIPT,
    disabled_names,
    env_names,
    find_project_config,
    plan_selection,
)

ENTRY_POINT_GROUP = "hooktrain"
#: Entry points that add subcommands to the ``hooktrain`` command line.
COMMAND_ENTRY_POINT_GROUP = "hooktrain.commands"
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
    #: Other distributions that claim the same name (``"dist version"``), ignored.
    shadowed: tuple[str, ...] = ()

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


def installed_plugins(group: str = ENTRY_POINT_GROUP) -> dict[str, InstalledPlugin]:
    """Every plugin installed in this environment, by entry-point name (or, given
    ``group=COMMAND_ENTRY_POINT_GROUP``, every subcommand of ``hooktrain``).

    Reads metadata only: nothing is imported. When two distributions claim one
    name, the first found wins, as ``importlib.metadata`` orders them; the others
    are kept in its ``shadowed``, and selecting the name warns.
    """
    found: dict[str, InstalledPlugin] = {}
    for entry_point in metadata.entry_points(group=group):
        dist = entry_point.dist
        distribution = dist.name if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        first = found.get(entry_point.name)
        if first is not None:
            if (distribution, entry_point.value) != (first.distribution, first.value):
                shadowed = (*first.shadowed, f"{distribution} {version}")
                found[entry_point.name] = dataclasses.replace(first, shadowed=shadowed)
            continue
        found[entry_point.name] = InstalledPlugin(
            name=entry_point.name,
            value=entry_point.value,
            distribution=distribution,
            version=version,
        )
    return found


def disabled_plugin_names() -> set[str]:
    """Names listed in ``HOOKTRAIN_DISABLE_PLUGINS``."""
    return set(env_names(DISABLE_ENV))


def _import_path(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if "=" in attribute:
        # "profile:limit=2" would otherwise import the standard library's profile
        # module and fail on an attribute named "limit=2".
        target = path.rpartition(":")[0]
        key = target if re.fullmatch(r"[A-Za-z0-9_-]+", target) else f'"{target}"'
        raise PluginError(
            f"plugin {path!r}: a name takes no options after ':' (that reads as "
            f"module:attribute); pass ({target!r}, {{options}}) in the script or "
            f"write them in [tool.hooktrain.plugin-options.{key}]"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            target = getattr(target, part)
    except Exception as exc:
        raise PluginError(
            f"plugin {path!r} could not be imported: {type(exc).__name__}: {exc}"
        ) from exc
    return target


def build_plugin(name: str, target: Any, options: Mapping[str, Any] | None) -> Any:
    """Turn what a selection points to (a class or factory, called with ``options``;
    a module or an instance, taken as it is) into a registrable plugin object.

    :raises PluginError: when the factory refuses ``options`` (a ``TypeError``, as
        its ``__cause__``), or options are given to something that takes none.
    """
    is_factory = inspect.isclass(target) or (
        inspect.isfunction(target) and not _has_hookimpls(target)
    )
    if is_factory:
        try:
            return target(**(options or {}))
        except TypeError as exc:
            raise PluginError(
                f"plugin {name!r}: cannot be constructed with options {dict(options or {})}: "
                f"{exc}{_options_hint(target, options or {})}"
            ) from exc
        except Exception as exc:
            # The plugin's own check of an option (a ValueError): its type is the
            # plugin's promise, kept; the note says which plugin of the list it was.
            exc.add_note(f"raised building plugin {name!r} with options {dict(options or {})}")
            raise
    if options:
        kind = "a module" if isinstance(target, types.ModuleType) else "an object"
        raise PluginError(
            f"plugin {name!r} is {kind}, not a class or factory, so it takes no options "
            f"(got {sorted(options)})"
        )
    return target


def _options_hint(factory: Any, options: Mapping[str, Any]) -> str:
    """The options ``factory`` takes, and the closest to each given one it does not:
    a misspelt option is the usual cause of the error this is appended to."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return ""
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return ""
    known = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    guesses = [
        f"{given!r} -> {close!r}"
        for given in options
        if given not in known and (close := closest_name(given, known)) is not None
    ]
    hint = f". Its options: {', '.join(known) or 'none'}"
    return hint + (f" (did you mean {'; '.join(guesses)}?)" if guesses else "")


def _has_hookimpls(obj: Any) -> bool:
    return hasattr(obj, PROJECT_NAME + "_impl")


def resolve_plugins(selection: Sequence[PluginSelection] | None) -> list[tuple[str, Any]]:
    """Load every selected plugin and return ``(name, plugin object)`` in list order.

    The list is the script's ``selection`` followed by what ``HOOKTRAIN_PLUGINS`` and
    the project's ``[tool.hooktrain]`` table add (see `hooktrain.selection`).

    :raises PluginError: for an unknown name (listing what is installed and the
        closest match), a plugin that fails to import (naming its distribution),
        bad options, or a malformed entry; each says where the entry was selected.
    :raises ConfigurationError: for a ``[tool.hooktrain]`` table that cannot be read.
    """
    return [(name, obj) for name, obj, _ in resolve_with_origins(selection)]


def resolve_with_origins(
    selection: Sequence[PluginSelection] | None,
) -> list[tuple[str, Any, str]]:
    """`resolve_plugins`, each entry with where it was selected (``"script"``, the
    environment, or the ``pyproject.toml``)."""
    installed: dict[str, InstalledPlugin] | None = None
    config = find_project_config()
    disabled = disabled_names(config)
    defaults: list[str] = []
    if selection is None:
        installed = installed_plugins()
        defaults = [name for name in DEFAULT_PLUGINS if name in installed]

    loaded: list[tuple[str, Any]] = []
    origins: list[str] = []
    for planned in plan_selection(selection, defaults, config):
        try:
            entry = _load_entry(planned.item, disabled, installed)
        except (PluginError, ConfigurationError) as exc:
            # A name or options written outside the script: say where, or the
            # user searches the script for them.
            notes = [] if planned.origin == SCRIPT else [f"selected by {planned.origin}"]
            if planned.options_origin is not None:
                notes.append(f"options from {planned.options_origin}")
            if not notes:
                raise
            raise type(exc)(f"{exc} ({'; '.join(notes)})") from exc
        if entry is None:
            continue
        if installed is None and entry[2]:
            installed = entry[2]
        loaded.append(entry[:2])
        origins.append(planned.origin)
    named = _unique_names(loaded)
    # A name that is no installed plugin disables nothing, and options under it go
    # to nothing: most likely misspellings, which would otherwise go without a word.
    said = [(name, f"{where} disables {name!r}") for name, where in disabled.items()]
    said += [(name, f"{config.origin} gives options to {name!r}") for name in config.plugin_options]
    if said:
        _say_unknown(said, installed, [name for name, _ in named])
    return [(name, obj, origin) for (name, obj), origin in zip(named, origins, strict=True)]


def _say_unknown(
    said: list[tuple[str, str]],
    installed: dict[str, InstalledPlugin] | None,
    selected: list[str],
) -> None:
    """Print, for each ``(name, what was said of it)`` whose name is no installed or
    selected plugin, that it applies to nothing, with the closest name."""
    known = {*(installed if installed is not None else installed_plugins()), *selected}
    for name, what in said:
        if name not in known:
            closest = closest_name(name, sorted(known))
            hint = f"; did you mean {closest!r}?" if closest else ""
            print(
                f"hooktrain: {what}, which is no installed plugin, so it applies to nothing{hint}",
                file=sys.stderr,
            )


def _load_entry(
    item: Any, disabled: Mapping[str, str], installed: dict[str, InstalledPlugin] | None
) -> tuple[str, Any, dict[str, InstalledPlugin] | None] | None:
    """Load one list entry: ``(name, plugin object, the installed plugins when they
    were read)``, or ``None`` when it is disabled."""
    options: Mapping[str, Any] | None = None
    target = item
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[1], Mapping):
            raise PluginError(f"plugin entry {item!r} must be a pair (name or object, {{options}})")
        target, options = item
    if isinstance(target, str):
        name = target
        if name in disabled:
            _say_disabled(name, disabled[name])
            return None
        if ":" in name:
            obj = _import_path(name)
        else:
            if installed is None:
                installed = installed_plugins()
            if name in installed:
                chosen = installed[name]
                if chosen.shadowed:
                    warn_user(
                        f"hooktrain: plugin {name!r} is provided by {chosen.distribution} "
                        f"{chosen.version}, which is used, and also by "
                        f"{', '.join(chosen.shadowed)}, ignored; uninstall the one you do "
                        f"not want",
                    )
                obj = chosen.load()
            elif "." in name:
                obj = _import_path(name)
            else:
                closest = closest_name(name, installed)
                hint = f" Did you mean {closest!r}?" if closest else ""
                # The README's table shows a plugin's distribution beside its name.
                provided = sorted(
                    plugin.name
                    for plugin in installed.values()
                    if _normalized(plugin.distribution) == _normalized(name)
                )
                if provided:
                    hint = (
                        f" {name!r} is the distribution; the plugin names it installs: "
                        f"{', '.join(map(repr, provided))}."
                    )
                known = ", ".join(sorted(installed)) or "none"
                raise PluginError(
                    f"unknown plugin {name!r}.{hint} Installed plugins: {known}. "
                    f"Install a distribution that registers it under the entry-point "
                    f"group {ENTRY_POINT_GROUP!r}, or pass an import path 'module:attribute'."
                )
        return name, build_plugin(name, obj, options), installed
    name = target.__name__ if inspect.isclass(target) else object_name(target)
    if name in disabled:
        _say_disabled(name, disabled[name])
        return None
    obj = build_plugin(name, target, options)
    return (object_name(obj) if inspect.isclass(target) else name), obj, installed


def _normalized(distribution: str) -> str:
    # PEP 503: hooktrain-tqdm, hooktrain_tqdm and HookTrain.TQDM are one distribution.
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _say_disabled(name: str, where: str) -> None:
    print(f"hooktrain: plugin {name!r} is disabled by {where}; running without it", file=sys.stderr)


def _unique_names(loaded: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A name each: the second plugin of a name is ``<name>-2``, and so on.

    :raises PluginError: when one object is listed twice (registered in reverse
        order, the error pluggy gives would name the second copy as the first).
    """
    seen: dict[str, int] = {}
    objects: set[int] = set()
    result = []
    for name, obj in loaded:
        if id(obj) in objects:
            raise PluginError(
                f"the same {type(obj).__name__} object is listed twice in the plugins "
                f"({name!r}); one object can be registered once (list it once, or make "
                f"a second instance)"
            )
        objects.add(id(obj))
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append((name if count == 0 else f"{name}-{count + 1}", obj))
    return result


def register_selection(
    manager: PluginManager, selection: Sequence[PluginSelection] | None
) -> list[tuple[str, str]]:
    """Load the selected plugins and register them on ``manager`` so that their
    implementations run in list order; return ``(registered name, origin)`` in that
    order (the origin as `resolve_with_origins` gives it).

    :raises ConfigurationError: for a plugin that cannot be found or built, or two
        that take one exclusive role, before any is registered.
    :raises PluginError: for a plugin whose hooks `PluginManager` refuses.
    """
    resolved = resolve_with_origins(selection)
    loaded = [(name, plugin) for name, plugin, _ in resolved]
    # Checked on the whole list first, so that the message names the two plugins
    # in the order the user listed them.
    check_exclusive_roles(loaded)
    for name, _ in loaded:
        if name == "core":
            # Registered after the selection, the defaults would otherwise be the
            # ones refused, with a message that blames them.
            raise PluginError(
                "a selected plugin is named 'core'; 'core' is the name of hooktrain's own "
                "hook implementations. Give the plugin another name (its class attribute "
                "name, or the name it is selected under)"
            )
    # pluggy calls the last registered implementation first; registering in
    # reverse makes the list order the call order.
    for name, plugin in reversed(loaded):
        manager.register(plugin, name=name)
    return [(name, origin) for name, _, origin in resolved]
