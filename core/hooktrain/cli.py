"""The ``hooktrain`` command line.

``hooktrain plugins`` reads package metadata only: it imports neither torch nor any
plugin, so it is fast and works even when an installed plugin is broken. Other
subcommands come from the entry-point group ``hooktrain.commands`` (the core's own
included), loaded only when invoked.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from hooktrain.markers import PROJECT_NAME
from hooktrain.plugins import (
    COMMAND_ENTRY_POINT_GROUP,
    ENTRY_POINT_GROUP,
    InstalledPlugin,
    disabled_plugin_names,
    installed_plugins,
)


def _hook_names() -> list[str]:
    from hooktrain import hookspecs

    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "hooktrain_spec"))


def _implemented_hooks(target: Any) -> list[str]:
    """Hooks a plugin target implements, found without constructing it."""
    names = []
    for attr in dir(target):
        try:
            value = inspect.getattr_static(target, attr)
        except AttributeError:
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if hasattr(value, PROJECT_NAME + "_impl"):
            names.append(attr)
    return names


def _check_registration(name: str, target: Any) -> str:
    """Register ``target``, built with no options, on a manager of its own, so that
    a plugin a Trainer would refuse (a misspelt hook, an argument the hook does not
    offer, a yield without ``wrapper=True``) is not listed as ok.

    :return: ``""``, or why registration was not checked: a plugin that cannot be
        built without options (a required argument, or its own check of one).
    :raises PluginError: what a Trainer selecting the plugin would raise.
    """
    from hooktrain.manager import PluginManager
    from hooktrain.plugins import build_plugin

    try:
        plugin = build_plugin(name, target, None)
    except (Exception, SystemExit) as exc:
        # Not broken: a plugin may rightly refuse to be built without its options.
        cause = exc.__cause__ or exc
        return (
            f" (hook arguments not checked: built with no options, it raised "
            f"{type(cause).__name__}: {cause})"
        )
    PluginManager().register(plugin, name)
    return ""


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def _disabled_here() -> set[str]:
    """Names disabled by the environment or by the project's ``[tool.hooktrain]``."""
    from hooktrain.errors import ConfigurationError
    from hooktrain.selection import disabled_names, find_project_config

    try:
        return set(disabled_names(find_project_config()))
    except ConfigurationError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return disabled_plugin_names()


def _list_plugins(detail: bool) -> int:
    installed = installed_plugins()
    disabled = _disabled_here()
    if not installed:
        print(f"no plugins installed (entry-point group {ENTRY_POINT_GROUP!r})")
        return 0
    rows = []
    broken = 0
    for name in sorted(installed):
        plugin = installed[name]
        row = [name, plugin.distribution, plugin.version]
        if name in disabled:
            row.append("disabled")
        elif detail:
            try:
                target = plugin.load()
                unchecked = _check_registration(name, target)
                hooks = _implemented_hooks(target)
                row.append("ok: " + (", ".join(hooks) or "no hooks") + unchecked)
            except Exception as exc:
                cause = exc.__cause__ or exc
                row.append(f"ERROR: {type(cause).__name__}: {cause}")
                broken += 1
        else:
            row.append("")
        rows.append(row)
    print(_table(rows, ["name", "distribution", "version", "hooks" if detail else "status"]))
    for name in sorted(installed):
        if installed[name].shadowed:
            print(
                f"note: {name!r} is also provided by {', '.join(installed[name].shadowed)}, "
                f"which is ignored"
            )
    # A script or CI step checking the installation needs the failure in the status.
    return 1 if broken else 0


def _show_selected() -> int:
    """Print what ``HOOKTRAIN_PLUGINS`` and the project's ``[tool.hooktrain]`` add to a
    run started here, where each comes from, and what is disabled. Imports nothing.

    :return: 1 when a name is not installed (a run would fail), else 0.
    """
    import os

    from hooktrain.errors import ConfigurationError, closest_name
    from hooktrain.selection import disabled_names, find_project_config, plan_selection

    try:
        config = find_project_config()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    disabled = disabled_names(config)
    installed = installed_plugins()
    print(f"run from {os.getcwd()}")
    print(f"project config: {config.origin if config.path else 'none found'}")
    print(
        "the script's own plugins=[...] come first; this command cannot see them. Added after them:"
    )
    rows = []
    missing = False
    for planned in plan_selection([], [], config):
        item = planned.item
        name, options = item if isinstance(item, tuple) else (item, {})
        if name in disabled:
            status = f"disabled by {disabled[name]}"
        elif name in installed:
            status = f"{installed[name].distribution} {installed[name].version}"
        elif ":" in name or "." in name:
            status = "import path"
        else:
            status = "NOT INSTALLED: a run fails"
            missing = True
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        rows.append([name, planned.origin, status, shown])
    if rows:
        print(_table(rows, ["name", "origin", "status", "options"]))
    else:
        print("  nothing")
    others = sorted(set(disabled) - {row[0] for row in rows})
    if others:
        print("disabled wherever selected: " + ", ".join(f"{n} ({disabled[n]})" for n in others))
    for name in others:
        if name not in installed:
            # A run says the same: a misspelt name disables nothing.
            close = closest_name(name, sorted(installed))
            hint = f"; did you mean {close!r}?" if close else ""
            print(f"  {name!r} is no installed plugin: disabling it does nothing{hint}")
    selected = {row[0] for row in rows}
    for name, options in config.plugin_options.items():
        if name not in selected:
            shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
            close = closest_name(name, sorted(installed))
            unknown = (
                ""
                if name in installed
                else " (NOT INSTALLED: they go to nothing"
                + (f"; did you mean {close!r}?)" if close else ")")
            )
            print(f"options for {name!r} when the script selects it by name: {shown}{unknown}")
    return 1 if missing else 0


def _show_order(selection: Sequence[str], check: bool = False) -> int:
    """Print, for each hook, the implementations in the order they will be called.

    The plugins are loaded and constructed with their default options, and the
    trainer is built on the CPU: no model, no data, no accelerator is touched.
    With ``check``, a set that cannot be built (two plugins taking one exclusive
    role, an unknown name, bad options) exits 1 with the trainer's message.
    """
    from hooktrain.errors import HooktrainError
    from hooktrain.plugins import exclusive_roles
    from hooktrain.trainer import Trainer

    try:
        trainer = Trainer(plugins=list(selection), device="cpu")
    except HooktrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if check else 2
    manager = trainer.plugin_manager
    added = {n: o for n, o in trainer.plugin_origins.items() if o != "script"}
    if added:
        print("added outside the list: " + ", ".join(f"{n} ({o})" for n, o in added.items()))
    if check:
        taken = [
            f"{role} ({name})"
            for name, plugin in manager.list_name_plugin()
            for role in exclusive_roles(name, plugin)
        ]
        print(f"compatible: exclusive roles taken: {', '.join(sorted(taken)) or 'none'}")
        _note_shared_answers(manager)
    print(f"call order for plugins={list(selection)!r} (wrappers surround the rest):")
    for hook_name in _hook_names():
        impls = getattr(manager.hook, hook_name).get_hookimpls()
        if not impls:
            continue
        # pluggy calls the list from its end: wrappers first, then the others.
        described = []
        for impl in reversed(impls):
            name = manager.get_name(impl.plugin) or "?"
            tags = [
                tag
                for tag, on in (
                    ("wrapper", impl.wrapper or impl.hookwrapper),
                    ("tryfirst", impl.tryfirst),
                    ("trylast", impl.trylast and name != "core"),
                )
                if on
            ]
            if name == "core":
                tags.append("default")
            described.append(name + (f" ({', '.join(tags)})" if tags else ""))
        print(f"  {hook_name:<28} {' -> '.join(described)}")
    return 0


def _note_shared_answers(manager: Any) -> None:
    """A note for each hook whose first result is its answer (``optimizer_step``...)
    that several plugins implement: the first in call order decides each call, and
    the others run only when it returns None. Intended (an observer returns None), or
    two plugins that each expect to do the work: only the user can tell."""
    from hooktrain.results import implementers

    for hook_name in _hook_names():
        caller = getattr(manager.hook, hook_name)
        if not (caller.spec and caller.spec.opts.get("firstresult")):
            continue
        plain = implementers(manager, hook_name)[::-1]  # in call order
        if len(plain) > 1:
            print(
                f"note: {hook_name} is answered by the first of {', '.join(plain)} to "
                f"return a value; the others run only when it returns None"
            )


def _list_hooks() -> int:
    from hooktrain import hookspecs

    for name in _hook_names():
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        # The first sentence, which a docstring's first line may cut in two.
        paragraph = " ".join(doc.split("\n\n")[0].split())
        sentence = paragraph.split(". ")[0].rstrip(".") + "."
        lines = textwrap.wrap(sentence, width=70) or [""]
        # An implementation takes any of these, by name; the docs say what each holds.
        lines.append("arguments: " + ", ".join(inspect.signature(spec).parameters))
        print(f"{name:<28} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<28} {line}")
    return 0


def _commands() -> dict[str, InstalledPlugin]:
    """The subcommands installed distributions register, by name. ``plugins`` is
    left out: the command that lists a broken installation must not be one that an
    installed package (broken, maybe) replaces."""
    commands = installed_plugins(COMMAND_ENTRY_POINT_GROUP)
    commands.pop("plugins", None)
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hooktrain`` and ``python -m hooktrain``."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader stopped early (``| head``): no traceback for that. stdout goes to
        # devnull so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if args and args[0] in commands:
        chosen = commands[args[0]]
        if chosen.shadowed:
            # Only the first found runs, as for a plugin name two distributions claim.
            print(
                f"note: command {args[0]!r} is also registered by "
                f"{', '.join(chosen.shadowed)}, which is ignored",
                file=sys.stderr,
            )
        try:
            command = chosen.load()
        except Exception as exc:
            cause = exc.__cause__ or exc
            print(f"error: command {args[0]!r} failed to load: {cause}", file=sys.stderr)
            return 2
        return int(command(args[1:]) or 0)

    parser = argparse.ArgumentParser(
        prog="hooktrain",
        description="hooktrain: a PyTorch trainer whose every phase is a plugin hook.",
    )
    sub = parser.add_subparsers(dest="command")
    for name, installed in sorted(commands.items()):
        # Listed for --help only (they run before argparse, above); their own
        # --help is not read here, which would import them. argparse %-formats help.
        text = f"from {installed.distribution}; hooktrain {name} --help".replace("%", "%%")
        sub.add_parser(name, help=text, add_help=False)
    plugins = sub.add_parser(
        "plugins",
        help="list installed plugins",
        description="List installed plugins from package metadata (imports nothing). "
        "Given plugin names, show each hook's implementations in call order.",
    )
    plugins.add_argument(
        "selection", nargs="*", metavar="PLUGIN", help="a plugin list to show the call order of"
    )
    plugins.add_argument(
        "--detail",
        action="store_true",
        help="import and register each plugin as a Trainer would: show its hooks, or why a "
        "Trainer would refuse it (exit status 1 if one is broken)",
    )
    plugins.add_argument("--hooks", action="store_true", help="list every hook of hooktrain")
    plugins.add_argument(
        "--check",
        action="store_true",
        help="check that the PLUGIN list can run together (no two take one exclusive role): "
        "exit 1 with the reason if not, else note compute hooks several plugins answer and "
        "print the call order; builds no model",
    )
    plugins.add_argument(
        "--selected",
        action="store_true",
        help="show what HOOKTRAIN_PLUGINS and pyproject.toml's [tool.hooktrain] add to a run "
        "started here, and where each comes from",
    )
    options = parser.parse_args(args)
    if options.command != "plugins":
        parser.print_help()
        return 0 if options.command is None and not args else 2
    # Each flag is its own view: the others, and plugin names, would be ignored.
    views = [flag for flag in ("hooks", "selected", "detail") if getattr(options, flag)]
    if len(views) > 1 or (views and views != ["detail"] and options.selection):
        plugins.error(f"--{views[0]} takes no other flag and no plugin names")
    if views == ["detail"] and options.selection:
        plugins.error("--detail lists the installed plugins; give it no plugin names")
    if options.hooks:
        return _list_hooks()
    if options.selected:
        return _show_selected()
    if options.check and not options.selection:
        parser.error("--check needs the plugin names to check")
    if options.selection:
        return _show_order(options.selection, check=options.check)
    return _list_plugins(options.detail)


if __name__ == "__main__":
    sys.exit(main())
