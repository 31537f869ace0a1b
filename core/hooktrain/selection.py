"""Where a run's plugin list comes from: the script, the environment, ``pyproject.toml``.

The script's ``Trainer(plugins=[...])`` comes first. After it, in this order, come
the names in ``HOOKTRAIN_PLUGINS`` (comma-separated) and the ``plugins`` list of the
project's ``[tool.hooktrain]`` table; a name already selected earlier is not added
again. Names in ``HOOKTRAIN_DISABLE_PLUGINS`` or in the table's ``disable`` list are
skipped wherever they were selected. ``[tool.hooktrain.plugin-options.NAME]`` gives
options to the plugin selected by the name ``NAME``, wherever it was selected; the
script's own options win key by key.

The project's table is found the way pytest finds its configuration: from the
current working directory upward, the first ``pyproject.toml`` holding a
``[tool.hooktrain]`` table (one without it is passed over). It is read when a
``Trainer`` is built, so a script run from a subfolder of the project finds it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hooktrain.errors import ConfigurationError

__all__ = [
    "DISABLE_ENV",
    "PLUGINS_ENV",
    "Planned",
    "ProjectConfig",
    "find_project_config",
    "plan_selection",
]

#: Comma-separated plugin names added to every run's selection, after the script's.
PLUGINS_ENV = "HOOKTRAIN_PLUGINS"
#: Comma-separated plugin names that are skipped (and never imported) even when selected.
DISABLE_ENV = "HOOKTRAIN_DISABLE_PLUGINS"
#: Where a plugin came from when the script's own list selected it.
SCRIPT = "script"
#: ... when ``Trainer(plugins=None)`` selected it as one of the default set.
DEFAULT = "default set (plugins=None)"
#: ... when ``HOOKTRAIN_PLUGINS`` selected it.
ENVIRONMENT = f"environment ({PLUGINS_ENV})"

_KEYS = ("plugins", "disable", "plugin-options")


@dataclass(frozen=True)
class ProjectConfig:
    """The ``[tool.hooktrain]`` table of a project's ``pyproject.toml``."""

    #: The file it was read from; ``None`` when no ``pyproject.toml`` has the table.
    path: Path | None = None
    plugins: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    #: Plugin name to its options (``[tool.hooktrain.plugin-options.NAME]``).
    plugin_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"{self.path} [tool.hooktrain]"


@dataclass(frozen=True)
class Planned:
    """One entry of a run's plugin list, before anything is imported."""

    #: What ``Trainer(plugins=[...])`` accepts: a name, an import path, an object,
    #: or a pair ``(any of those, {options})`` (file options merged in already).
    item: Any
    #: ``"script"``, the default set, the environment, or the ``pyproject.toml``.
    origin: str
    #: The ``pyproject.toml`` that gave some of its options, else ``None``.
    options_origin: str | None = None


def env_names(variable: str) -> list[str]:
    """The comma-separated names in environment variable ``variable``."""
    raw = os.environ.get(variable, "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def find_project_config(start: str | os.PathLike[str] | None = None) -> ProjectConfig:
    """Read the first ``pyproject.toml`` with a ``[tool.hooktrain]`` table, looking in
    ``start`` (default: the current working directory) and then each parent.

    :raises ConfigurationError: for a file that is not valid TOML, or a table with an
        unknown key or a value of the wrong type (naming the file).
    """
    directory = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (directory, *directory.parents):
        path = folder / "pyproject.toml"
        if not path.is_file():
            continue
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"{path}: cannot read it as TOML: {exc}") from exc
        table = document.get("tool", {}).get("hooktrain")
        if table is not None:
            return _parse_table(path, table)
    return ProjectConfig()


def _parse_table(path: Path, table: Any) -> ProjectConfig:
    where = f"{path} [tool.hooktrain]"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where} must be a table")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key {', '.join(map(repr, unknown))}; known keys: {', '.join(_KEYS)}"
        )
    lists = {}
    for key in ("plugins", "disable"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigurationError(
                f"{where}: {key} must be a list of plugin names, got {value!r}"
            )
        lists[key] = tuple(value)
    options = table.get("plugin-options", {})
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigurationError(
            f"{where}: plugin-options must hold one table per plugin "
            f"([tool.hooktrain.plugin-options.NAME]), got {options!r}"
        )
    return ProjectConfig(path, lists["plugins"], lists["disable"], options)


def disabled_names(config: ProjectConfig) -> dict[str, str]:
    """Name to where it was disabled: ``HOOKTRAIN_DISABLE_PLUGINS`` or the file."""
    disabled = {name: config.origin for name in config.disable}
    disabled.update({name: DISABLE_ENV for name in env_names(DISABLE_ENV)})
    return disabled


def plan_selection(
    script: Sequence[Any] | None,
    defaults: Sequence[str],
    config: ProjectConfig,
) -> list[Planned]:
    """The whole plugin list of a run, each entry with where it came from.

    :param script: what the script passed as ``plugins=`` (``None`` for the default
        set, which is then ``defaults``).
    :param defaults: the default names that are installed.
    :param config: the project's table (`find_project_config`).
    :raises ConfigurationError: for options from the file given to a plugin the
        script selected as an object (they can be given only to a name).
    """
    if script is None:
        planned = [Planned(name, DEFAULT) for name in defaults]
    else:
        planned = [Planned(item, SCRIPT) for item in script]
    seen = {_selected_name(p.item) for p in planned}
    extra = [(name, ENVIRONMENT) for name in env_names(PLUGINS_ENV)]
    extra += [(name, config.origin) for name in config.plugins]
    for name, origin in extra:
        if name not in seen:
            seen.add(name)
            planned.append(Planned(name, origin))
    return [_with_file_options(p, config) for p in planned]


def _selected_name(item: Any) -> Any:
    target = item[0] if isinstance(item, tuple) and item else item
    return target if isinstance(target, str) else None


def _with_file_options(planned: Planned, config: ProjectConfig) -> Planned:
    name = _selected_name(planned.item)
    if name is None or name not in config.plugin_options:
        return planned
    from_file = dict(config.plugin_options[name])
    item = planned.item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
        # The script's options win, key by key.
        return Planned((name, {**from_file, **item[1]}), planned.origin, config.origin)
    return Planned((name, from_file), planned.origin, config.origin)
