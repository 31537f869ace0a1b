"""Timing every hook implementation, for the trace and the profiler.

Instrumenting replaces each registered implementation's function with a timed
wrapper; nothing is wrapped unless someone asks, so the loop pays nothing when
tracing and profiling are off.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import pluggy

#: ``record(hook_name, plugin_name, seconds)``
Recorder = Callable[[str, str, float], None]

TRACE_ENV = "HOOKTRAIN_TRACE"


def _timed_function(function: Callable[..., Any], hook: str, plugin: str, record: Recorder):
    clock = time.perf_counter

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            record(hook, plugin, clock() - start)

    return timed


def _timed_wrapper(
    function: Callable[..., Generator[Any, Any, Any]], hook: str, plugin: str, record: Recorder
):
    """Time a wrapper implementation: the code before its ``yield`` and after it,
    not the implementations it surrounds."""
    clock = time.perf_counter

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        generator = function(*args, **kwargs)
        start = clock()
        try:
            yielded = next(generator)
        finally:
            spent = clock() - start
        try:
            sent = yield yielded
        except BaseException as exc:  # what the surrounded implementations raised
            start = clock()
            try:
                generator.throw(exc)
            except StopIteration as stop:
                return stop.value
            finally:
                record(hook, plugin, spent + clock() - start)
            raise RuntimeError(f"wrapper {plugin}.{hook} yielded twice") from None
        start = clock()
        try:
            generator.send(sent)
        except StopIteration as stop:
            return stop.value
        finally:
            record(hook, plugin, spent + clock() - start)
        raise RuntimeError(f"wrapper {plugin}.{hook} yielded twice")

    return timed


def instrument(plugin_manager: pluggy.PluginManager, record: Recorder) -> Callable[[], None]:
    """Wrap every registered hook implementation so that each call reports its time.

    :return: a function that puts the original implementations back.
    """
    originals: list[tuple[Any, Callable[..., Any]]] = []
    for hook_name in dir(plugin_manager.hook):
        if hook_name.startswith("_"):
            continue
        caller = getattr(plugin_manager.hook, hook_name)
        for impl in caller.get_hookimpls():
            original = impl.function
            plugin_name = plugin_manager.get_name(impl.plugin) or impl.plugin_name
            if impl.wrapper or impl.hookwrapper:
                impl.function = _timed_wrapper(original, hook_name, plugin_name, record)
            else:
                impl.function = _timed_function(original, hook_name, plugin_name, record)
            originals.append((impl, original))

    def restore() -> None:
        for impl, original in originals:
            impl.function = original

    return restore


def implementation_code(function: Callable[..., Any]) -> Any:
    """The code object of a (possibly instrumented) implementation."""
    return getattr(inspect.unwrap(function), "__code__", None)


def stderr_tracer(hook: str, plugin: str, seconds: float) -> None:
    """The recorder behind ``HOOKTRAIN_TRACE=1``: one line per implementation call."""
    print(f"[hooktrain trace] {hook:<28} {plugin:<20} {seconds * 1e6:10.1f} us", file=sys.stderr)
