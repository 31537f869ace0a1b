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
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from hooktrain import hookspecs
from hooktrain.errors import ConfigurationError, PluginError, closest_name, warn_user
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


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin installed in this environment, by entry-point name.

    Reads metadata only: nothing is imported. When two distributions claim one
    name, the first found wins, as ``importlib.metadata`` orders them; the others
    are kept in its ``shadowed``, and selecting the name warns.
    """
    found: dict[str, InstalledPlugin] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
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


def _object_name(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    declared = getattr(obj, "name", None)
    if isinstance(declared, str) and declared:
        return declared
    return type(obj).__name__


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
    if disabled:
        _say_unknown_disabled(disabled, installed, [name for name, _ in named])
    return [(name, obj, origin) for (name, obj), origin in zip(named, origins, strict=True)]


def _say_unknown_disabled(
    disabled: Mapping[str, str],
    installed: dict[str, InstalledPlugin] | None,
    selected: list[str],
) -> None:
    """A disabled name that is no installed plugin disables nothing: most likely a
    misspelling, which would otherwise leave the plugin running without a word."""
    known = {*(installed if installed is not None else installed_plugins()), *selected}
    for name, where in disabled.items():
        if name not in known:
            closest = closest_name(name, sorted(known))
            hint = f"; did you mean {closest!r}?" if closest else ""
            print(
                f"hooktrain: {where} disables {name!r}, which is no installed plugin, so it "
                f"disables nothing{hint}",
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
                known = ", ".join(sorted(installed)) or "none"
                raise PluginError(
                    f"unknown plugin {name!r}.{hint} Installed plugins: {known}. "
                    f"Install a distribution that registers it under the entry-point "
                    f"group {ENTRY_POINT_GROUP!r}, or pass an import path 'module:attribute'."
                )
        return name, _instantiate(name, obj, options), installed
    name = target.__name__ if inspect.isclass(target) else _object_name(target)
    if name in disabled:
        _say_disabled(name, disabled[name])
        return None
    obj = _instantiate(name, target, options)
    return (_object_name(obj) if inspect.isclass(target) else name), obj, installed


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


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for the project ``hooktrain``, stricter on registration.

    A hook implementation whose name matches no hookspec is refused at once
    (pluggy would accept it silently until ``check_pending``), naming the plugin,
    the bad name and the closest hook; an argument a hook does not offer is refused
    the same way, and so is an argument with a default value (pluggy never passes
    one: it would keep its default) or ``*args``/``**kwargs`` (never filled). A
    method named like a hook but not marked ``@hookimpl`` (which pluggy ignores) is
    warned about. A plugin taking an exclusive role that a registered plugin holds
    is refused too (`check_exclusive_roles`), also when registered during a run.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        name = name or _object_name(plugin)
        roles = exclusive_roles(name, plugin)
        if roles:
            check_exclusive_roles([*self.list_name_plugin(), (name, plugin)])
        spec_names = [n for n in dir(self.hook) if not n.startswith("_")]
        for attr in dir(plugin):
            if attr.startswith("__"):
                continue
            opts = self.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                if attr in spec_names and callable(getattr(plugin, attr, None)):
                    # pluggy registers marked functions only: this one would sit unused.
                    _warn_at_definition(
                        getattr(plugin, attr),
                        f"hooktrain: plugin {name!r} defines {attr}() without @hookimpl, "
                        f"so hooktrain never calls it; mark it with @hooktrain.hookimpl",
                    )
                continue
            # pluggy's specname lets an attribute of another name implement a hook.
            hook_name = opts.get("specname") or attr
            if not hasattr(self.hook, hook_name):
                closest = closest_name(hook_name, spec_names)
                hint = f"; did you mean {closest!r}?" if closest else ""
                raise PluginError(
                    f"plugin {name!r} implements {hook_name!r}, which is not a hooktrain "
                    f"hook{hint} (see 'hooktrain plugins --hooks' for the list)"
                )
            offered = list(inspect.signature(getattr(hookspecs, hook_name)).parameters)
            try:
                parameters = list(inspect.signature(getattr(plugin, attr)).parameters.values())
            except (TypeError, ValueError):
                continue
            variadic = [p for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if variadic:
                # pluggy passes arguments by the names an implementation lists: *args
                # and **kwargs list none, so they would stay empty on every call.
                stars = ", ".join(
                    ("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name for p in variadic
                )
                raise PluginError(
                    f"plugin {name!r}: its {hook_name} takes {stars}, which a hook never "
                    f"fills (arguments are passed by the names an implementation lists). "
                    f"Name the arguments it needs; {hook_name} offers ({', '.join(offered)})"
                )
            defaulted = [p.name for p in parameters if p.default is not p.empty]
            if defaulted:
                # pluggy passes only the arguments taken without a default: one with a
                # default (Lightning's ``dataloader_idx=0``) would silently keep it.
                raise PluginError(
                    f"plugin {name!r}: its {hook_name} gives {', '.join(defaulted)} a default "
                    f"value; a hook passes only the arguments an implementation takes "
                    f"without one, so the default would be used on every call. Remove "
                    f"the default; {hook_name} offers ({', '.join(offered)})"
                )
            unknown = [p.name for p in parameters if p.name not in offered]
            if unknown:
                raise PluginError(
                    f"plugin {name!r}: its {hook_name} takes {', '.join(unknown)}, which the hook "
                    f"does not offer; {hook_name} offers ({', '.join(offered)})"
                )
        try:
            return super().register(plugin, name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc
        except ValueError as exc:
            # pluggy's refusal of a taken name or of an object registered twice dumps
            # its whole registry: say which it is, and what to do.
            raise PluginError(self._conflict(plugin, name, exc)) from exc

    def _conflict(self, plugin: Any, name: str, refusal: ValueError) -> str:
        taken = self.get_plugin(name)
        if taken is not None and taken is not plugin:
            holder = (
                "hooktrain's own hook implementations"
                if name == "core"
                else f"another plugin ({type(taken).__name__})"
            )
            return (
                f"plugin {name!r} cannot be registered: the name is taken by {holder}; "
                f"give the plugin another name (its class attribute name, or the name "
                f"passed to register)"
            )
        if self.is_registered(plugin):
            return (
                f"plugin {name!r} is registered already, as {self.get_name(plugin)!r}; "
                f"one object can be registered once (list it once, or make a second instance)"
            )
        return f"plugin {name!r} cannot be registered: {refusal}"


def _warn_at_definition(function: Any, message: str) -> None:
    """Warn with the location where ``function`` is defined (the plugin author's
    line), not the line of hooktrain that registers it; fall back to the caller's."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        warn_user(message)
        return
    warnings.warn_explicit(message, UserWarning, code.co_filename, code.co_firstlineno)
