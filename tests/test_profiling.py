"""The ``profile`` plugin: a table of time per plugin and hook, and the loop's own.

The profiler reads ``time.perf_counter``; these tests replace it with a clock that
moves only when a test's plugin or data says so. Real sleeps would make every
comparison depend on the machine: on a busy one the core's forward step can take
longer than a plugin's sleep. With the fake clock each row's time is known exactly,
so a time counted in the wrong row shows as a wrong number.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch.nn.functional as F

import hooktrain
from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain.profiling import ProfilePlugin, ProfileReport
from hooktrain.testing import make_data, run

SLEEP = 0.002


class FakeClock:
    """Stands in for ``time.perf_counter``: stopped, except for :meth:`advance`.

    Everything real (the model's compute, pluggy, the loop) takes no time on it;
    only what a test advances does.
    """

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


class SlowBatchEnd:
    """Takes SLEEP seconds in every on_train_batch_end: a plugin a user would want
    to find."""

    name = "slow"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.clock.advance(SLEEP)


class SlowLoading:
    """Training batches that take ``seconds`` each to load: time the loop spends
    outside every hook."""

    def __init__(self, batches: Any, clock: FakeClock, seconds: float) -> None:
        self.batches, self.clock, self.seconds = batches, clock, seconds

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.clock.advance(self.seconds)
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def _profile(result) -> ProfilePlugin:
    plugin = result.trainer.plugin_manager.get_plugin("profile")
    assert isinstance(plugin, ProfilePlugin)
    return plugin


def test_selected_by_entry_point_name_it_finds_the_slow_plugin(clock):
    stream = io.StringIO()
    train, val = make_data()
    loading = 0.0005
    result = run(
        [SlowBatchEnd(clock), ("profile", {"stream": stream})],
        record=False,
        data=(SlowLoading(train, clock, loading), val),
    )
    report = _profile(result).report
    assert isinstance(report, ProfileReport)
    steps = result.trainer.global_step
    assert steps > 0 and report.stage == "fit" and report.steps == steps

    slow = report.row("on_train_batch_end", "slow")
    assert slow is not None and slow.calls == steps
    assert slow.seconds == pytest.approx(steps * SLEEP)
    assert slow.mean_seconds == pytest.approx(SLEEP)
    assert report.rows[0] is slow
    by_plugin = report.by_plugin()
    assert next(iter(by_plugin)) == "slow"
    assert by_plugin["slow"] == pytest.approx(steps * SLEEP)

    # Hooks only the core implements are called directly by the loop, bypassing
    # pluggy; they are timed all the same.
    forward = report.row("forward_step", "core")
    assert forward is not None and forward.calls >= steps
    assert report.row("optimizer_step", "core").calls == steps
    # Loading the batches is timed as the core's batch iterator's next(), a
    # batch a call (the validation batches' too, which cost nothing here); the loop
    # itself took no time on this clock.
    loads = report.row("batch_iterator next()", "core")
    assert loads is not None and loads.calls == steps + 2 * len(val)
    assert loads.seconds == pytest.approx(steps * loading)
    assert report.hook_seconds == pytest.approx(steps * (SLEEP + loading))
    assert report.wall_seconds == pytest.approx(steps * (SLEEP + loading))
    assert report.loop_seconds == pytest.approx(0.0)

    text = stream.getvalue()
    assert "hooktrain profile: fit" in text
    assert "on_train_batch_end" in text and "slow" in text
    assert "(outside hooks: the loop itself)" in text
    assert text.strip() == report.format().strip()
    # The profiler does not list itself.
    assert all(row.plugin != "profile" for row in report.rows)


class SlowIterator:
    """A batch_iterator plugin (a prefetcher, a sharder) taking SLEEP per batch."""

    name = "slow_iterator"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    @hookimpl
    def batch_iterator(self, dataloader, skip_batches):
        for index, batch in enumerate(dataloader):
            if index >= skip_batches:
                self.clock.advance(SLEEP)
                yield batch


def test_a_batch_iterator_plugin_is_timed_as_its_batches_are_drawn(clock):
    # Its generator ran after the hook returned: the time showed in the loop's own
    # row, and the plugin's row read 0.
    train, val = make_data()
    result = run([SlowIterator(clock), "profile"], record=False, data=(train, val))
    report = _profile(result).report
    batches = result.trainer.global_step + 2 * len(val)  # 2 epochs, each validated
    drawn = report.row("batch_iterator next()", "slow_iterator")
    assert drawn is not None and drawn.calls == batches
    assert drawn.seconds == pytest.approx(batches * SLEEP)
    assert report.by_plugin()["slow_iterator"] == pytest.approx(batches * SLEEP)
    assert report.loop_seconds == pytest.approx(0.0)
    assert report.row("batch_iterator next()", "core") is None  # the plugin answered


def test_implementations_are_unwrapped_after_the_stage(clock):
    plugin = ProfilePlugin(print_report=False)
    slow = SlowBatchEnd(clock)
    result = run([slow, plugin], record=False)
    manager = result.trainer.plugin_manager
    for hook_name in ("on_train_batch_end", "forward_step", "setup", "teardown"):
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            assert not hasattr(impl.function, "__wrapped__"), (hook_name, impl.plugin_name)
    # Calling a hook now records nothing more.
    calls = plugin.report.row("on_train_batch_end", "slow").calls
    manager.hook.on_train_batch_end(trainer=result.trainer, outputs=None, batch=None, batch_idx=0)
    assert plugin.report.row("on_train_batch_end", "slow").calls == calls


class Nesting:
    """on_train_epoch_end calls another hook: its time belongs to the inner one."""

    name = "nesting"

    def __init__(self, clock: FakeClock, outer: float, inner: float) -> None:
        self.clock, self.outer, self.inner = clock, outer, inner

    @hookimpl
    def on_train_epoch_end(self, trainer):
        self.clock.advance(self.outer)
        trainer.plugin_manager.hook.on_save_checkpoint(trainer=trainer, checkpoint={})

    @hookimpl
    def on_save_checkpoint(self, trainer, checkpoint):
        self.clock.advance(self.inner)


def test_nested_hook_time_counts_once_in_the_innermost(clock):
    plugin = ProfilePlugin(print_report=False)
    run([Nesting(clock, outer=0.003, inner=0.05), plugin], record=False, max_epochs=2)
    report = plugin.report
    inner = report.row("on_save_checkpoint", "nesting")
    outer = report.row("on_train_epoch_end", "nesting")
    assert inner.calls == outer.calls == 2
    assert inner.seconds == pytest.approx(2 * 0.05)
    # The outer implementation's own time, without the inner call it made.
    assert outer.seconds == pytest.approx(2 * 0.003)
    assert report.hook_seconds == pytest.approx(report.wall_seconds)


class Surrounding:
    """A wrapper around forward_step that takes SLEEP before and after the others."""

    name = "surrounding"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    @hookimpl(wrapper=True)
    def forward_step(self, trainer, batch, batch_idx, stage):
        self.clock.advance(SLEEP)
        result = yield
        self.clock.advance(SLEEP)
        return result


class SurroundedForward:
    """A plain forward_step that takes time and defers (returns None) to the core's."""

    name = "surrounded"

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    @hookimpl
    def forward_step(self, trainer, batch, batch_idx, stage):
        self.clock.advance(self.seconds)


def test_a_wrapper_is_timed_without_what_it_surrounds(clock):
    plugin = ProfilePlugin(print_report=False)
    surrounded = 0.5
    run([Surrounding(clock), SurroundedForward(clock, surrounded), plugin], record=False)
    report = plugin.report
    wrapper = report.row("forward_step", "surrounding")
    inner = report.row("forward_step", "surrounded")
    core = report.row("forward_step", "core")
    assert wrapper.calls == inner.calls == core.calls > 0
    # The wrapper's own time before and after its yield, not the implementations it
    # surrounds; theirs is theirs, and none of the wrapper's lands in the core's row.
    assert wrapper.seconds == pytest.approx(wrapper.calls * 2 * SLEEP)
    assert inner.seconds == pytest.approx(inner.calls * surrounded)
    assert core.seconds == pytest.approx(0.0, abs=1e-12)
    assert report.hook_seconds == pytest.approx(report.wall_seconds)


def test_every_stage_gets_its_own_report():
    plugin = ProfilePlugin(print_report=False)
    result = run([plugin], record=False, max_epochs=1)
    _, val = make_data()
    result.trainer.validate(result.model, val, loss_fn=F.cross_entropy)
    assert [r.stage for r in plugin.reports] == ["fit", "validate"]
    assert plugin.report.stage == "validate"
    assert plugin.report.row("forward_step", "core").calls == len(val)


def test_limit_shortens_the_printed_table(clock):
    report = ProfilePlugin(print_report=False)
    run([SlowBatchEnd(clock), report], record=False)
    text = report.report.format(limit=1)
    assert "more rows" in text
    assert text.count("\n") < report.report.format().count("\n")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stream": "report.txt"}, "stream must be a text stream"),
        ({"limit": "three"}, "limit must be an integer >= 1"),
        ({"limit": 0}, "limit must be an integer >= 1"),
        ({"all_ranks": "yes"}, "all_ranks must be True or False"),
    ],
)
def test_bad_options_are_refused_before_the_stage(options, message):
    # Each failed only in teardown, once the whole fit had run.
    with pytest.raises(ConfigurationError, match=message):
        hooktrain.Trainer(plugins=[("profile", options)])


class SizesTheLoader:
    """A wrapper that reads what the batch_iterator hook returned: the loader."""

    name = "sizes"

    def __init__(self) -> None:
        self.seen: list[int] = []

    @hookimpl(wrapper=True)
    def batch_iterator(self):
        result = yield
        self.seen.append(len(result))
        return result


class SlowWrappingIterator:
    """A prefetcher written as a wrapper: its generator takes SLEEP per batch."""

    name = "slow_wrapper"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    @hookimpl(wrapper=True)
    def batch_iterator(self):
        inner = yield

        def batches():
            for batch in inner:
                self.clock.advance(SLEEP)
                yield batch

        return batches()


def test_other_batch_iterator_implementations_see_what_they_would_unprofiled(clock):
    # Timing wrapped each implementation's result inside the hook: a wrapper got a
    # generator where it had the loader, and len() failed with the profiler on only.
    sizes = SizesTheLoader()
    train, val = make_data()
    run([sizes, "profile"], record=False, data=(train, val), max_epochs=1)
    assert sizes.seen == [len(train), len(val)]


def test_a_prefetcher_written_as_a_wrapper_is_timed_too(clock):
    train, val = make_data()
    result = run([SlowWrappingIterator(clock), "profile"], record=False, data=(train, val))
    report = _profile(result).report
    batches = result.trainer.global_step + 2 * len(val)
    drawn = report.row("batch_iterator next()", "slow_wrapper")
    assert drawn is not None and drawn.calls == batches
    assert drawn.seconds == pytest.approx(batches * SLEEP)
    assert report.loop_seconds == pytest.approx(0.0)
