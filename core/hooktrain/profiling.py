"""The ``profile`` plugin: where a stage's time goes, per hook and per plugin.

Select it like any plugin; when each stage ends it prints a table of the time
spent in every plugin's implementation of every hook, and the loop's own time::

    trainer = hooktrain.Trainer(plugins=["tqdm", "tensorboard", "profile"])
    trainer.fit(model, loader, ...)
    trainer.plugin_manager.get_plugin("profile").report.rows  # the same, as data

It needs no profiler: in ``setup`` it wraps every registered hook implementation
with a timer (:func:`hooktrain.instrument.instrument`) and unwraps them in
``teardown``. A wrapper implementation (``wrapper=True``) is timed without the
implementations it surrounds, and a hook called from inside another hook (a
checkpoint plugin calling ``trainer.dump_checkpoint()``, which calls
``on_save_checkpoint``) counts only in the innermost one, so the rows add up to the
time spent in hooks. The core's own implementations appear under the plugin name
``core``: ``forward_step``, ``backward`` and ``optimizer_step`` there are the
model's own compute, and ``batch_iterator next()`` the data loading: each batch
drawn from the iterator the ``batch_iterator`` hook returned, under the plugins that
implement or wrap that hook (``core`` when none does). What remains of the stage's
wall time is the loop itself.

Timing costs about a microsecond per implementation call, which the table counts
in the hooks' times.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError
from hooktrain.instrument import instrument
from hooktrain.markers import hookimpl
from hooktrain.results import implementers, wrappers

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["HookTiming", "ProfilePlugin", "ProfileReport"]

# Records kept to find the calls nested in a later one; far more than hooks nest.
_OPEN_CALLS_KEPT = 256


@dataclass(frozen=True)
class HookTiming:
    """One plugin's implementation of one hook, over one stage."""

    hook: str
    plugin: str
    calls: int
    #: Seconds inside the implementation, without hooks it called in turn.
    seconds: float

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class ProfileReport:
    """What :class:`ProfilePlugin` measured over one stage."""

    stage: str
    #: From the start of ``setup`` to the end of ``teardown``.
    wall_seconds: float
    #: Optimizer steps taken during the stage.
    steps: int
    #: Every (hook, plugin) pair that was called, most time first.
    rows: tuple[HookTiming, ...]

    @property
    def hook_seconds(self) -> float:
        """Time inside hook implementations (nested calls counted once)."""
        return sum(row.seconds for row in self.rows)

    @property
    def loop_seconds(self) -> float:
        """The loop's own time: the stage's wall time outside every hook."""
        return max(0.0, self.wall_seconds - self.hook_seconds)

    def by_plugin(self) -> dict[str, float]:
        """Seconds per plugin, summed over its hooks, most first."""
        totals: dict[str, float] = {}
        for row in self.rows:
            totals[row.plugin] = totals.get(row.plugin, 0.0) + row.seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def row(self, hook: str, plugin: str) -> HookTiming | None:
        """The row of ``plugin``'s implementation of ``hook``, if it was called."""
        for row in self.rows:
            if row.hook == hook and row.plugin == plugin:
                return row
        return None

    def format(self, limit: int | None = None) -> str:
        """The report as a text table (at most ``limit`` hook rows)."""
        wall = self.wall_seconds or 1e-12
        per_step = f", {self.wall_seconds / self.steps * 1e3:.3f} ms/step" if self.steps else ""
        lines = [
            f"hooktrain profile: {self.stage}, {self.wall_seconds:.3f} s wall, "
            f"{self.steps} steps{per_step}",
            f"  {'hook':<28} {'plugin':<18} {'calls':>8} {'total s':>9} {'mean us':>10} "
            f"{'share':>7}",
        ]
        rows = self.rows if limit is None else self.rows[:limit]
        for row in rows:
            lines.append(
                f"  {row.hook:<28} {row.plugin:<18} {row.calls:>8} {row.seconds:>9.4f} "
                f"{row.mean_seconds * 1e6:>10.1f} {row.seconds / wall:>7.1%}"
            )
        if len(rows) < len(self.rows):
            rest = sum(row.seconds for row in self.rows[len(rows) :])
            lines.append(
                f"  {f'({len(self.rows) - len(rows)} more rows)':<47} {'':>8} {rest:>9.4f} "
                f"{'':>10} {rest / wall:>7.1%}"
            )
        loop = self.loop_seconds
        per_step_loop = f"{loop / self.steps * 1e6:>10.1f}" if self.steps else f"{'':>10}"
        lines.append(
            f"  {'(outside hooks: the loop itself)':<47} {'':>8} {loop:>9.4f} {per_step_loop} "
            f"{loop / wall:>7.1%}"
        )
        lines.append(
            "  per plugin: "
            + ", ".join(
                f"{plugin} {seconds:.4f} s ({seconds / wall:.1%})"
                for plugin, seconds in self.by_plugin().items()
            )
        )
        return "\n".join(lines)


class ProfilePlugin:
    """Times every hook implementation and prints a table when each stage ends.

    :param stream: where the table goes (default ``sys.stderr``); ``None`` there.
    :param print_report: set ``False`` to keep the report as data only.
    :param limit: print at most this many hook rows (all by default).
    :param all_ranks: print on every process, not only on rank 0.
    :raises ConfigurationError: for a ``stream`` without ``write``, a ``limit`` that is
        not an integer >= 1, or flags that are not booleans: checked here, not when
        the report is printed at the end of the stage.
    """

    name = "profile"

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        print_report: bool = True,
        limit: int | None = None,
        all_ranks: bool = False,
    ) -> None:
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ConfigurationError(
                f"profile: stream must be a text stream (with write), such as an open "
                f"file or sys.stdout, got {type(stream).__name__} {stream!r}"
            )
        whole = isinstance(limit, int) and not isinstance(limit, bool)
        if limit is not None and not (whole and limit >= 1):
            raise ConfigurationError(
                f"profile: limit must be an integer >= 1 or None, got {limit!r}"
            )
        for flag, value in (("print_report", print_report), ("all_ranks", all_ranks)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"profile: {flag} must be True or False, got {value!r}")
        self.stream = stream
        self.print_report = print_report
        self.limit = limit
        self.all_ranks = all_ranks
        #: The report of the last stage that ended (``None`` before).
        self.report: ProfileReport | None = None
        #: Every stage's report, in order.
        self.reports: list[ProfileReport] = []
        self._restore: Callable[[], None] | None = None
        self._totals: dict[tuple[str, str], list[float]] = {}
        self._open: list[tuple[float, float]] = []
        self._wrappers: set[tuple[str, str]] = set()
        self._own_name = self.name
        self._start = 0.0
        self._steps_before = 0

    def _record(self, hook: str, plugin: str, seconds: float) -> None:
        if self._restore is None or plugin == self._own_name:
            return
        key = (hook, plugin)
        if key not in self._wrappers:
            # A call's interval contains those of the calls nested in it, which
            # ended (and were recorded) before it: take their time off this one.
            end = time.perf_counter()
            start = end - seconds
            open_calls = self._open
            nested = 0.0
            while open_calls and open_calls[-1][0] >= start:
                nested += open_calls.pop()[1]
            open_calls.append((start, seconds))
            if len(open_calls) > _OPEN_CALLS_KEPT:
                del open_calls[: _OPEN_CALLS_KEPT // 2]
            seconds = max(0.0, seconds - nested)
        entry = self._totals.get(key)
        if entry is None:
            self._totals[key] = [1, seconds]
        else:
            entry[0] += 1
            entry[1] += seconds

    @hookimpl(tryfirst=True)
    def setup(self, trainer: Trainer, stage: str) -> None:
        # tryfirst: every implementation is wrapped before the loop resolves its
        # hooks (after setup), so even a hook only the core implements is timed.
        if self._restore is not None:
            self._restore()
        manager = trainer.plugin_manager
        self._own_name = manager.get_name(self) or self.name
        self._totals = {}
        self._open = []
        self._wrappers = {
            (hook_name, manager.get_name(impl.plugin) or impl.plugin_name)
            for hook_name in dir(manager.hook)
            if not hook_name.startswith("_")
            for impl in getattr(manager.hook, hook_name).get_hookimpls()
            if impl.wrapper or impl.hookwrapper
        }
        self._steps_before = trainer.global_step
        self._start = time.perf_counter()
        self._restore = instrument(manager, self._record)

    @hookimpl(wrapper=True, tryfirst=True)
    def batch_iterator(self, trainer: Trainer) -> Generator[None, Any, Any]:
        # Batches are drawn after the hook returns: a prefetching plugin's time (and
        # the core's data loading) is spent there. Outermost, so that every other
        # implementation sees the same result as without the profiler.
        iterable = yield
        if self._restore is None or iterable is None:
            return iterable
        manager = trainer.plugin_manager
        names = implementers(manager, "batch_iterator") + wrappers(manager, "batch_iterator")
        names = [name for name in names if name != self._own_name]
        return self._timed_batches(iterable, "+".join(names) or "core")

    def _timed_batches(self, iterable: Any, plugin: str) -> Any:
        """``iterable``'s batches, each ``next`` recorded as ``batch_iterator next()``
        of ``plugin``; ``iterable`` itself when it is no iterable, for the loop to
        report as it would."""
        try:
            iterator = iter(iterable)
        except TypeError:
            return iterable
        clock = time.perf_counter

        def batches() -> Generator[Any, None, None]:
            while True:
                start = clock()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self._record("batch_iterator next()", plugin, clock() - start)
                yield batch

        return batches()

    @hookimpl(trylast=True)
    def teardown(self, trainer: Trainer, stage: str) -> None:
        wall = time.perf_counter() - self._start
        if self._restore is not None:
            self._restore()
            self._restore = None
        rows = tuple(
            sorted(
                (
                    HookTiming(hook, plugin, int(calls), seconds)
                    for (hook, plugin), (calls, seconds) in self._totals.items()
                ),
                key=lambda row: -row.seconds,
            )
        )
        steps = trainer.global_step - self._steps_before if stage == "fit" else 0
        self.report = ProfileReport(stage=stage, wall_seconds=wall, steps=max(0, steps), rows=rows)
        self.reports.append(self.report)
        if self.print_report and (self.all_ranks or trainer.is_global_zero):
            print(self.report.format(self.limit), file=self.stream or sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"ProfilePlugin(stages={len(self.reports)})"
