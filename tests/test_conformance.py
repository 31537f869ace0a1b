"""`PluginConformance` run by pytest (through ``pytester``) against plugins it was
never written for: a correct outside plugin passes unmodified; plugins breaking a
contract fail the check for it, with a message saying what to do."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from hooktrain.testing import PluginConformance

pytest_plugins = ["pytester"]

# An outside author's plugin, written without the suite in mind: it logs the global
# gradient norm as a tensor (read only when a logger asks).
GRAD_NORM = """
import torch
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class GradNorm:
    name = "grad_norm"

    @hookimpl(tryfirst=True)  # the gradients as the loop made them, whatever the order
    def on_before_optimizer_step(self, trainer, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        trainer.log("grad_norm", torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))


class TestGradNorm(PluginConformance):
    plugin = GradNorm
"""

READS_LOSS = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class LossPrinter:
    name = "loss_printer"

    def __init__(self):
        self.losses = []

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.losses.append(float(trainer.metrics["loss"]))  # reads the device every step


class TestLossPrinter(PluginConformance):
    plugin = LossPrinter()
"""

UNSAVED_COUNTER = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class Warmup:
    name = "warmup"

    def __init__(self, steps=20):
        self.steps = steps
        self.done = 0  # never saved in checkpoints

    @hookimpl
    def on_before_optimizer_step(self, optimizer):
        self.done += 1
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * min(1.0, self.done / self.steps)


class TestWarmup(PluginConformance):
    plugin = ("test_warmup:Warmup", {"steps": 20})
"""

ORDER = """
import torch
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class Clip:
    @hookimpl
    def on_before_optimizer_step(self, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 0.05)


class ClipLast:
    @hookimpl(trylast=True)
    def on_before_optimizer_step(self, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 0.05)


class TestClip(PluginConformance):
    plugin = Clip


class TestClipLast(PluginConformance):
    plugin = ClipLast
"""

HIDES_ERRORS = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class ExitOnError:
    name = "exit_on_error"

    def __init__(self, strict=False):
        self.strict = strict  # documented as a bool, never checked

    @hookimpl
    def on_train_epoch_end(self, trainer):
        pass

    @hookimpl
    def on_exception(self, exception):
        raise SystemExit(1)  # "exit cleanly": the user never sees what failed, nor where


class TestExitOnError(PluginConformance):
    plugin = ExitOnError
    documented_errors = [({"strict": "yes"}, "strict must be True or False")]
"""

BARE_VALUE_ERROR = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class Every:
    name = "every"

    def __init__(self, every=1):
        if every < 1:
            raise ValueError("every must be >= 1")  # a bug or a bad option? No one can tell
        self.every = every

    @hookimpl
    def on_train_epoch_end(self, trainer):
        pass


class TestEvery(PluginConformance):
    plugin = Every
    documented_errors = [({"every": 0}, "every must be >= 1")]
"""

LATE_OPTION_ERROR = """
from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain.testing import PluginConformance


class Prefix:
    name = "prefix"

    def __init__(self, prefix="norm/"):
        self.prefix = prefix  # checked only when first used, inside the first step

    @hookimpl
    def on_before_optimizer_step(self, trainer, optimizer):
        if not isinstance(self.prefix, str):
            raise ConfigurationError(f"prefix: prefix must be a string, got {self.prefix!r}")


class TestPrefix(PluginConformance):
    plugin = Prefix
    documented_errors = [({"prefix": 5}, "prefix must be a string")]


class Checked(Prefix):
    name = "checked"

    def __init__(self, prefix="norm/"):
        if not isinstance(prefix, str):
            raise ConfigurationError(f"checked: prefix must be a string, got {prefix!r}")
        self.prefix = prefix


class TestChecked(PluginConformance):
    plugin = Checked
    documented_errors = [({"prefix": 5}, "prefix must be text")]  # the regex alone is wrong


class AtFitStart(Prefix):
    name = "at_fit_start"

    @hookimpl
    def on_fit_start(self, trainer):  # before the first step: in time
        if not isinstance(self.prefix, str):
            raise ConfigurationError(f"at_fit_start: prefix must be a string, got {self.prefix!r}")


class TestAtFitStart(PluginConformance):
    plugin = AtFitStart
    documented_errors = [({"prefix": 5}, "prefix must be a string")]
"""

UNRESTORED_STATE = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class StepCounter:
    \"\"\"Counts steps and saves the count, but never reads it back: the weights and
    the published values cannot tell.\"\"\"

    name = "step_counter"

    def __init__(self):
        self.seen = 0

    @hookimpl
    def on_train_batch_end(self):
        self.seen += 1

    @hookimpl
    def on_save_checkpoint(self, trainer, checkpoint):
        checkpoint["plugins"][trainer.plugin_manager.get_name(self)] = {"seen": self.seen}


class TestStepCounter(PluginConformance):
    plugin = StepCounter


class TestStepCounterDeclared(PluginConformance):
    plugin = StepCounter
    run_specific_state = ["seen"]
"""

NOT_SLOW = ("-m", "not slow", "-p", "no:cacheprovider")


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k in ("passed", "failed")}


def test_a_correct_outside_plugin_passes_unmodified(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_grad_norm=GRAD_NORM)
    result = pytester.runpytest_subprocess(*NOT_SLOW, "-rs")
    assert outcomes(result) == {"passed": 4}, result.stdout.str()
    # No documented_errors declared: skipped, saying how to declare them.
    result.stdout.fnmatch_lines(["*no documented_errors declared*"])


def test_plugins_breaking_a_contract_fail_the_check_for_it(pytester: pytest.Pytester) -> None:
    # One pytest process for the four plugins: each file's class runs the checks
    # its plugin breaks (and the order check its trylast twin passes).
    pytester.makepyfile(
        test_loss_printer=READS_LOSS,
        test_warmup=UNSAVED_COUNTER,
        test_clip=ORDER,
        test_exit=HIDES_ERRORS,
        test_every=BARE_VALUE_ERROR,
        test_prefix=LATE_OPTION_ERROR,
    )
    selected = (
        "(LossPrinter and host_sync) or (Warmup and resume) or (Clip and order) "
        "or (ExitOnError and (exceptions or documented)) or (Every and documented) "
        "or (Prefix and documented) or (Checked and documented) or (AtFitStart and documented)"
    )
    result = pytester.runpytest_subprocess(*NOT_SLOW, "-k", selected)
    text = result.stdout.str()
    assert outcomes(result) == {"passed": 2, "failed": 8}, text
    for failed in (
        "test_loss_printer.py::TestLossPrinter::test_no_host_sync_per_step",
        "test_warmup.py::TestWarmup::test_exact_resume_after_sigterm",
        "test_clip.py::TestClip::test_order_independence",
        "test_exit.py::TestExitOnError::test_hook_exceptions_name_the_plugin",
        "test_exit.py::TestExitOnError::test_documented_errors_are_clear",
        "test_every.py::TestEvery::test_documented_errors_are_clear",
        "test_prefix.py::TestPrefix::test_documented_errors_are_clear",
        "test_prefix.py::TestChecked::test_documented_errors_are_clear",
    ):
        assert f"FAILED {failed}" in text
    # (b) points at the plugin's own line and says what to do instead.
    assert "test_loss_printer.py:13 (on_train_batch_end): 8 reads over 8 steps, 16" in text
    assert "trainer.log(name, tensor)" in text
    # (a) says the plugin saves nothing.
    assert "'test_warmup:Warmup' implements neither on_save_checkpoint nor" in text
    # (c) tells how to say where it must run; its trylast twin passed.
    assert "@hookimpl(tryfirst=True)" in text
    assert "FAILED test_clip.py::TestClipLast" not in text
    # (e) an exit from on_exception (which the core reports rather than let it hide
    # the error), and a documented bad option accepted.
    assert "its own on_exception raised" in text
    assert "plugin 'exit_on_error' raised in hook 'on_exception'" in text
    assert "SystemExit: 1). Do not raise, nor end the process (sys.exit)" in text
    assert "documented errors: options {'strict': 'yes'} were accepted and trained" in text
    # (e) a bare ValueError is not a traceback of the plugin's own: the contract says
    # what to raise instead.
    assert "were refused with ValueError: every must be >= 1; a refused option" in text
    assert "raise hooktrain.errors.ConfigurationError (a ValueError)" in text
    # (e) an option refused inside the first step (global step still 0) is late, and
    # a refusal in time whose message alone misses says only that.
    assert "it was raised after training began (in 'on_before_optimizer_step')" in text
    assert "but its message does not match 'prefix must be text'." in text


UNSAVED_LOGGED_VALUE = """
import time
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class StepCounter:
    name = "step_counter"

    def __init__(self):
        self.steps = 0  # never saved: a resumed run counts from 0 again

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.steps += 1
        trainer.log("counted_steps", float(self.steps))


class Stopwatch:
    name = "stopwatch"

    @hookimpl
    def on_train_epoch_end(self, trainer):
        trainer.log("epoch_wall_time", time.perf_counter())


class TestStepCounter(PluginConformance):
    plugin = StepCounter


class TestStopwatch(PluginConformance):
    plugin = Stopwatch
    wall_clock_metrics = ("*_wall_time",)
"""


def test_a_logged_value_lost_on_resume_fails_though_the_weights_match(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_logged=UNSAVED_LOGGED_VALUE)
    result = pytester.runpytest_subprocess(*NOT_SLOW, "-k", "resume")
    text = result.stdout.str()
    assert outcomes(result) == {"passed": 1, "failed": 1}, text
    assert "FAILED test_logged.py::TestStepCounter::test_exact_resume_after_sigterm" in text
    # The value published is epoch 2's mean: steps 7 to 12 counted 7 to 12 (9.5); the
    # resumed run restored 7, 8, 9 with the trainer's means, then counted 1, 2, 3 (5.0).
    assert "counted_steps: 9.5 uninterrupted, 5.0 resumed" in text
    # A value that measures time is left out when the class lists it.
    assert "FAILED test_logged.py::TestStopwatch" not in text


RANK_DEPENDENT = """
from hooktrain import hookimpl
from hooktrain.testing import PluginConformance


class RankZeroBoost:
    # After the gradients were averaged: the ranks' weights drift apart.
    @hookimpl
    def on_before_optimizer_step(self, trainer, optimizer):
        if trainer.global_rank == 0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad.mul_(2.0)


class TestRankZeroBoost(PluginConformance):
    plugin = RankZeroBoost
"""


@pytest.mark.slow
def test_two_processes_catch_a_plugin_that_differs_by_rank(pytester: pytest.Pytester) -> None:
    # Looked up, not imported: pytester drops the modules a test imports when it
    # ends, and accelerate's torch extensions imported a second time crashed the
    # next test of this file run alone (SystemError, then a segmentation fault).
    if importlib.util.find_spec("hooktrain_accelerate") is None:
        pytest.skip("needs hooktrain-accelerate")
    pytester.makepyfile(test_rank=textwrap.dedent(RANK_DEPENDENT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "two_processes")
    text = result.stdout.str()
    assert outcomes(result) == {"failed": 1}, text
    assert "rank 0 and rank 1 end with different weights" in text


class TestProfileConformance(PluginConformance):
    """The core's own plugin passes the suite too."""

    plugin = "profile"


def test_a_saved_state_that_is_never_restored_fails_the_resume_check(
    pytester: pytest.Pytester,
) -> None:
    # Its weights and published values were right, so the check passed it: an EMA
    # kept aside for validation only, lost on resume, went unseen the same way.
    pytester.makepyfile(test_counter=UNRESTORED_STATE)
    result = pytester.runpytest_subprocess(*NOT_SLOW, "-k", "resume")
    text = result.stdout.str()
    assert outcomes(result) == {"passed": 1, "failed": 1}, text
    assert "FAILED test_counter.py::TestStepCounter::test_exact_resume_after_sigterm" in text
    assert "another saved state of 'step_counter'" in text
    assert "at seen (12 and 3)" in text


def test_a_value_logged_from_gradients_another_plugin_changes_fails_the_order_check(
    pytester: pytest.Pytester,
) -> None:
    # Read in a plain on_before_optimizer_step, the norm was taken before or after
    # the neighbour halved the gradients, by list order; the weights, all the check
    # compared, were the same.
    plain = GRAD_NORM.replace("@hookimpl(tryfirst=True)", "@hookimpl")
    assert plain != GRAD_NORM
    pytester.makepyfile(test_plain_norm=plain)
    result = pytester.runpytest_subprocess(*NOT_SLOW, "-k", "order")
    text = result.stdout.str()
    assert outcomes(result) == {"failed": 1}, text
    assert "trains other weights or publishes other values (grad_norm: " in text
    assert " listed first, " in text and " listed last)" in text
