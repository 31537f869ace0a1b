"""The ``profile`` plugin: a table of time per plugin and hook, and the loop's own."""

from __future__ import annotations

import io
import time

import pytest
import torch.nn.functional as F

from hooktrain import hookimpl
from hooktrain.profiling import ProfilePlugin, ProfileReport
from hooktrain.testing import make_data, run

SLEEP = 0.002


class SlowBatchEnd:
    """Sleeps in every on_train_batch_end: a plugin a user would want to find."""

    name = "slow"

    @hookimpl
    def on_train_batch_end(self, trainer):
        time.sleep(SLEEP)


def _profile(result) -> ProfilePlugin:
    plugin = result.trainer.plugin_manager.get_plugin("profile")
    assert isinstance(plugin, ProfilePlugin)
    return plugin


def test_selected_by_entry_point_name_it_finds_the_slow_plugin():
    stream = io.StringIO()
    result = run([SlowBatchEnd(), ("profile", {"stream": stream})], record=False)
    report = _profile(result).report
    assert isinstance(report, ProfileReport)
    steps = result.trainer.global_step
    assert report.stage == "fit" and report.steps == steps

    slow = report.row("on_train_batch_end", "slow")
    assert slow is not None and slow.calls == steps
    assert slow.seconds >= steps * SLEEP  # sleep guarantees at least this much
    assert slow.mean_seconds == pytest.approx(slow.seconds / steps)
    # The slow plugin is the biggest cost that is not the model's own compute.
    non_core = [row for row in report.rows if row.plugin != "core"]
    assert non_core[0] is slow
    assert list(report.by_plugin())[:2].count("slow") == 1

    # Hooks only the core implements are called directly by the loop, bypassing
    # pluggy; they are timed all the same.
    forward = report.row("forward_step", "core")
    assert forward is not None and forward.calls >= steps
    assert report.row("optimizer_step", "core").calls == steps
    assert report.hook_seconds + report.loop_seconds == pytest.approx(report.wall_seconds)
    assert report.loop_seconds > 0

    text = stream.getvalue()
    assert "hooktrain profile: fit" in text
    assert "on_train_batch_end" in text and "slow" in text
    assert "(outside hooks: the loop itself)" in text
    assert text.strip() == report.format().strip()
    # The profiler does not list itself.
    assert all(row.plugin != "profile" for row in report.rows)


def test_implementations_are_unwrapped_after_the_stage():
    plugin = ProfilePlugin(print_report=False)
    slow = SlowBatchEnd()
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

    @hookimpl
    def on_train_epoch_end(self, trainer):
        trainer.plugin_manager.hook.on_save_checkpoint(trainer=trainer, checkpoint={})

    @hookimpl
    def on_save_checkpoint(self, trainer, checkpoint):
        time.sleep(0.05)


def test_nested_hook_time_counts_once_in_the_innermost():
    plugin = ProfilePlugin(print_report=False)
    run([Nesting(), plugin], record=False, max_epochs=2)
    report = plugin.report
    inner = report.row("on_save_checkpoint", "nesting")
    outer = report.row("on_train_epoch_end", "nesting")
    assert inner.calls == outer.calls == 2
    assert inner.seconds >= 0.1
    # The outer implementation does nothing but call the inner one.
    assert outer.seconds < inner.seconds


class Surrounding:
    """A wrapper around forward_step that sleeps before and after the real one."""

    name = "surrounding"

    @hookimpl(wrapper=True)
    def forward_step(self, trainer, batch, batch_idx, stage):
        time.sleep(SLEEP)
        result = yield
        return result


def test_a_wrapper_is_timed_without_what_it_surrounds():
    plugin = ProfilePlugin(print_report=False)
    run([Surrounding(), plugin], record=False)
    report = plugin.report
    wrapper = report.row("forward_step", "surrounding")
    core = report.row("forward_step", "core")
    assert wrapper.calls == core.calls
    assert wrapper.seconds >= wrapper.calls * SLEEP
    # The sleeps are the wrapper's, not the core's.
    assert core.seconds < wrapper.seconds


def test_every_stage_gets_its_own_report():
    plugin = ProfilePlugin(print_report=False)
    result = run([plugin], record=False, max_epochs=1)
    _, val = make_data()
    result.trainer.validate(result.model, val, loss_fn=F.cross_entropy)
    assert [r.stage for r in plugin.reports] == ["fit", "validate"]
    assert plugin.report.stage == "validate"
    assert plugin.report.row("forward_step", "core").calls == len(val)


def test_limit_shortens_the_printed_table():
    report = ProfilePlugin(print_report=False)
    run([SlowBatchEnd(), report], record=False)
    text = report.report.format(limit=1)
    assert "more rows" in text
    assert text.count("\n") < report.report.format().count("\n")
