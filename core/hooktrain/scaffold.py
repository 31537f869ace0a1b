"""``hooktrain new-plugin NAME``: write a complete, installable plugin distribution.

The result is ready to ``pip install``: a ``pyproject.toml`` registering the plugin
under the entry-point group ``hooktrain``, a typed plugin module, a README, and tests
written with :mod:`hooktrain.testing` that pass as generated. The templates ship
inside the package (``hooktrain/templates/plugin``), so the command works from an
installed wheel. Registered as a subcommand through the entry-point group
``hooktrain.commands``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["PluginNames", "create_plugin", "main"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")

# template file -> path inside the new distribution ("{package}" is substituted)
_FILES: dict[str, str] = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "plugin.py.tmpl": "{package}/__init__.py",
    "py.typed": "{package}/py.typed",
    "test_plugin.py.tmpl": "tests/test_{name}.py",
}


#: Names the templates bind already (imports, the test's classes) and Python's
#: constants: a plugin class of that name would shadow one, or not compile.
_TAKEN_CLASS_NAMES = frozenset(
    {
        "Any",
        "ConfigurationError",
        "False",
        "Mapping",
        "None",
        "Path",
        "PluginConformance",
        "SaveInTheSecondEpoch",
        "TestConformance",
        "Trainer",
        "True",
    }
)


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the one the user typed (``batch-counter``)."""

    name: str  #: entry-point name, used in ``plugins=[...]``: ``batch_counter``
    dist: str  #: distribution name, used by pip: ``hooktrain-batch-counter``
    package: str  #: import package: ``hooktrain_batch_counter``
    cls: str  #: plugin class: ``BatchCounter``

    @classmethod
    def from_name(cls, raw: str) -> PluginNames:
        """Derive the names; raise ``ValueError`` for a name that cannot make them,
        for one whose class name the generated code binds already (``trainer``,
        ``plugin-conformance``) or pytest would collect (``test-helper``), or for
        ``core``, the name of hooktrain's own implementations."""
        raw = raw.strip()
        if raw.startswith("hooktrain-") or raw.startswith("hooktrain_"):
            raw = raw[len("hooktrain-") :]
        if not _NAME.match(raw):
            raise ValueError(
                f"plugin name {raw!r} is not usable: use lowercase letters, digits and single "
                f"'-' or '_' between words, starting with a letter (e.g. 'batch-counter')"
            )
        words = re.split(r"[-_]", raw)
        if words == ["core"]:
            # The trainer registers its own defaults as "core" and refuses a plugin
            # selected under that name.
            raise ValueError(
                "plugin name 'core' is reserved for hooktrain's own hook implementations; "
                "choose another name"
            )
        class_name = "".join(word.capitalize() for word in words)
        if class_name.startswith("Test"):
            # Imported into the generated tests, a class named Test* is one pytest
            # tries to collect as a test class, and warns that it cannot.
            raise ValueError(
                f"plugin name {raw!r} would make the class {class_name!r}, which pytest "
                f"would take for a test class in the generated tests; choose a name "
                f"that does not start with 'test'"
            )
        if class_name in _TAKEN_CLASS_NAMES:
            raise ValueError(
                f"plugin name {raw!r} would make the class {class_name!r}, which the "
                f"generated code uses for something else (an import, a test class, a "
                f"constant); choose another name (e.g. '{raw}-plugin')"
            )
        return cls(
            name="_".join(words),
            dist="hooktrain-" + "-".join(words),
            package="hooktrain_" + "_".join(words),
            cls=class_name,
        )


def _render(text: str, names: PluginNames, description: str) -> str:
    from hooktrain import __version__

    major_minor = ".".join(__version__.split(".")[:2])
    values = {
        "name": names.name,
        "dist": names.dist,
        "package": names.package,
        "class": names.cls,
        "description": description,
        "hooktrain_version": major_minor,
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def create_plugin(
    name: str,
    directory: str | Path = ".",
    *,
    description: str | None = None,
    force: bool = False,
) -> Path:
    """Write the distribution for plugin ``name`` into ``directory/hooktrain-<name>``.

    :param name: the plugin's name (``batch-counter`` or ``batch_counter``).
    :param directory: where the distribution folder is created.
    :param description: one sentence for the package metadata and README.
    :param force: write into an existing folder (overwriting the generated files),
        and use the name of an installed plugin.
    :return: the distribution folder.
    :raises ValueError: for an unusable name, or the name of an installed plugin
        (installing the new one would take that name, or replace its distribution)
        unless ``force``.
    :raises FileExistsError: when the folder exists and ``force`` is false.
    """
    names = PluginNames.from_name(name)
    if not force:
        from hooktrain.plugins import installed_plugins

        taken = installed_plugins().get(names.name)
        if taken is not None:
            raise ValueError(
                f"a plugin named {names.name!r} is installed already ({taken.distribution} "
                f"{taken.version}): installing {names.dist} would take its name, or replace "
                f"it; choose another name, or pass --force to create it anyway"
            )
    if description is None:
        description = f"A hooktrain plugin: {names.name.replace('_', ' ')}."
    description = " ".join(description.split()).replace('"', "'")
    root = Path(directory) / names.dist
    if root.exists() and not force:
        raise FileExistsError(f"{root} already exists; choose another folder or pass --force")
    templates = resources.files("hooktrain").joinpath("templates", "plugin")
    for template, target in _FILES.items():
        path = root / target.format(package=names.package, name=names.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = templates.joinpath(template).read_text(encoding="utf-8")
        path.write_text(_render(text, names, description), encoding="utf-8")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``hooktrain new-plugin NAME [--directory DIR] [--description TEXT] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="hooktrain new-plugin",
        description="Write a complete plugin distribution (pyproject.toml with the entry "
        "point, a typed plugin module, a README and passing tests) into ./hooktrain-NAME.",
    )
    parser.add_argument("name", help="the plugin's name, e.g. batch-counter")
    parser.add_argument("-d", "--directory", default=".", help="where to create it (default: .)")
    parser.add_argument("--description", help="one sentence for the metadata and README")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing folder; allow the name of an installed plugin",
    )
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        root = create_plugin(
            options.name, options.directory, description=options.description, force=options.force
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = PluginNames.from_name(options.name)
    print(f"created {root}/")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}")
    print(
        "next:\n"
        f"  pip install -e {root}        # registers the entry point '{names.name}'\n"
        f"  hooktrain plugins            # lists it\n"
        f"  python -m pytest {root}      # its tests pass as generated\n"
        f'  Trainer(plugins=["{names.name}"])'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
