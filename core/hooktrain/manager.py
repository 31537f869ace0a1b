"""hooktrain's pluggy manager: registration that refuses what pluggy would let
pass silently (a misspelt hook, an argument no hook passes) and names the plugin.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Any

import pluggy

from hooktrain import hookspecs
from hooktrain.errors import PluginError, closest_name, warn_user
from hooktrain.markers import PROJECT_NAME
from hooktrain.roles import check_exclusive_roles, exclusive_roles

__all__ = ["PluginManager", "object_name"]

# Hooks of Lightning's Callback and Keras's callbacks that hooktrain calls by
# another name. Spelling alone would point elsewhere: the name closest to
# on_epoch_end is on_test_epoch_end, a hook fit never calls, and the closest to
# on_train_start is on_train_epoch_start, which runs every epoch, not once.
_NAMED_OTHERWISE = {
    "on_train_start": ("Lightning", "on_fit_start"),
    "on_train_end": ("Lightning", "on_fit_end"),
    "on_epoch_start": ("Lightning", "on_train_epoch_start"),
    "on_epoch_end": ("Lightning", "on_train_epoch_end"),
    "on_batch_start": ("Lightning", "on_train_batch_start"),
    "on_batch_end": ("Lightning", "on_train_batch_end"),
    "on_train_begin": ("Keras", "on_fit_start"),
    "on_epoch_begin": ("Keras", "on_train_epoch_start"),
    "on_train_batch_begin": ("Keras", "on_train_batch_start"),
    "on_test_begin": ("Keras", "on_validation_start (on_test_start in test())"),
    "on_test_batch_begin": ("Keras", "on_validation_batch_start (on_test_batch_start in test())"),
    "on_predict_begin": ("Keras", "on_predict_start"),
    "on_predict_batch_begin": ("Keras", "on_predict_batch_start"),
}


def object_name(obj: Any) -> str:
    """The name a plugin object registers under when none is given: a module's
    name, the object's ``name`` attribute, or its class name."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    declared = getattr(obj, "name", None)
    if isinstance(declared, str) and declared:
        return declared
    return type(obj).__name__


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for the project ``hooktrain``, stricter on registration.

    A hook implementation whose name matches no hookspec is refused at once
    (pluggy would accept it silently until ``check_pending``), naming the plugin,
    the bad name and the closest hook; an argument a hook does not offer is refused
    the same way, and so is an argument with a default value (pluggy never passes
    one: it would keep its default) or ``*args``/``**kwargs`` (never filled). A
    method named like a hook but not marked ``@hookimpl`` (which pluggy ignores) is
    warned about, and one that yields without ``wrapper=True`` is refused (its body
    would never run), unless its hook answers with an iterable (``batch_iterator``).
    A plugin taking an exclusive role that a registered plugin holds
    is refused too (`check_exclusive_roles`), also when registered during a run.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        name = name or object_name(plugin)
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
                if hook_name in _NAMED_OTHERWISE:
                    trainer, ours = _NAMED_OTHERWISE[hook_name]
                    hint = f"; {trainer}'s {hook_name} is {ours} here"
                raise PluginError(
                    f"plugin {name!r} implements {hook_name!r}, which is not a hooktrain "
                    f"hook{hint} (see 'hooktrain plugins --hooks' for the list)"
                )
            if opts.get("tryfirst") and opts.get("trylast"):
                # pluggy would take trylast and drop the other without a word.
                raise PluginError(
                    f"plugin {name!r}: its {hook_name} is marked both tryfirst and trylast; "
                    f"an implementation runs either first or last. Keep the one you mean"
                )
            spec = inspect.signature(getattr(hookspecs, hook_name))
            if (
                not (opts.get("wrapper") or opts.get("hookwrapper"))
                and inspect.isgeneratorfunction(getattr(plugin, attr, None))
                and not answers_with_an_iterable(spec)
            ):
                # pluggy would call it and get a generator back, never run: the body
                # would not execute, and a firstresult hook would take the generator
                # as its answer. (A hook answering with an iterable, batch_iterator,
                # is rightly a generator: its body runs as the loop draws from it.)
                raise PluginError(
                    f"plugin {name!r}: its {hook_name} yields, but is not marked "
                    f"@hookimpl(wrapper=True); as a plain implementation its body would "
                    f"never run. Mark it a wrapper, or remove the yield"
                )
            offered = list(spec.parameters)
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


def answers_with_an_iterable(spec: inspect.Signature) -> bool:
    """Whether a hookspec's declared result is an iterable (its annotation, a string
    under postponed evaluation, names ``Iterable`` or ``Iterator``)."""
    return any(word in str(spec.return_annotation) for word in ("Iterable", "Iterator"))


def _warn_at_definition(function: Any, message: str) -> None:
    """Warn with the location where ``function`` is defined (the plugin author's
    line), not the line of hooktrain that registers it; fall back to the caller's."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        warn_user(message)
        return
    warnings.warn_explicit(message, UserWarning, code.co_filename, code.co_firstlineno)
