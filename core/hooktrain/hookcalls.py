"""Hooks as the loop calls them: looked up once per stage.

pluggy's caller is general: it copies the implementation list, runs a
generator-based loop built for wrappers, and costs about a microsecond a call
even with a single plain implementation. A loop that calls several hooks a step
would pay that on every step, so each stage resolves every hook once, after
``prepare`` (which may register or wrap things), to the cheapest callable that
gives exactly pluggy's results:

* ``None`` when nothing implements the hook: the loop does not call it;
* the core's function itself when only the core implements it;
* a direct caller when no implementation is a wrapper (held to pluggy's results
  by ``tests/test_direct_calls.py``);
* pluggy's own caller otherwise.

Instrumentation (profile, trace) replaces ``impl.function`` before hooks are
resolved, so it sees these calls too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hooktrain import hookspecs

if TYPE_CHECKING:
    import pluggy

__all__ = ["HOOK_NAMES", "ResolvedHooks", "direct_caller"]

#: Every hook the core declares, by name.
HOOK_NAMES: tuple[str, ...] = tuple(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "hooktrain_spec")
)


class ResolvedHooks:
    """Every hook of ``plugin_manager`` as an attribute of the same name, resolved
    as the module docstring says; ``core`` is the object holding the core's own
    implementations."""

    def __init__(self, plugin_manager: pluggy.PluginManager, core: object) -> None:
        for name in HOOK_NAMES:
            caller = getattr(plugin_manager.hook, name)
            impls = caller.get_hookimpls()
            if not impls:
                resolved: Any = None
            elif len(impls) == 1 and impls[0].plugin is core:
                resolved = impls[0].function
            elif any(impl.wrapper or impl.hookwrapper for impl in impls):
                resolved = caller
            else:
                firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))
                resolved = direct_caller(impls, firstresult)
            setattr(self, name, resolved)

    def __getattr__(self, name: str) -> Any:  # only for names missing from hookspecs
        raise AttributeError(f"hooktrain has no hook named {name!r}")


def direct_caller(impls: Sequence[Any], firstresult: bool) -> Callable[..., Any]:
    """Call plain implementations (no wrappers among them) the way pluggy would: in
    its order (the reverse of ``get_hookimpls()``), each given only the arguments it
    names, returning the first non-``None`` result for a ``firstresult`` hook and the
    list of non-``None`` results otherwise."""
    calls = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(impls))
    # ``map`` picks the named arguments without a Python frame of its own, which a
    # list comprehension has before Python 3.12: on the benchmark's MLP, calling one
    # plugin's per-step hook cost about 3 us a step, half of it in this glue.
    if len(calls) == 1:
        ((function, names),) = calls

        def call_one_first(**kwargs: Any) -> Any:
            return function(*map(kwargs.__getitem__, names))

        def call_one(**kwargs: Any) -> list[Any]:
            result = function(*map(kwargs.__getitem__, names))
            return [] if result is None else [result]

        return call_one_first if firstresult else call_one

    def call_first(**kwargs: Any) -> Any:
        pick = kwargs.__getitem__
        for function, names in calls:
            result = function(*map(pick, names))
            if result is not None:
                return result
        return None

    def call_each(**kwargs: Any) -> list[Any]:
        pick = kwargs.__getitem__
        results = []
        for function, names in calls:
            result = function(*map(pick, names))
            if result is not None:
                results.append(result)
        return results

    return call_first if firstresult else call_each
