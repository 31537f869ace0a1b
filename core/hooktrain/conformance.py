"""`PluginConformance`: ready-made tests every plugin's test suite inherits.

A plugin's test module subclasses it with one attribute::

    from hooktrain.testing import PluginConformance

    class TestMyPlugin(PluginConformance):
        plugin = ("myplugin", {"every": 2})  # anything plugins=[...] accepts

and pytest collects the checks below, each a small real training job on the CPU
(``docs/testing-a-plugin.md`` explains each one and how to meet it):

* ``test_exact_resume_after_sigterm``: killed mid-epoch, resumed: the same weights
  and published values;
* ``test_no_host_sync_per_step``: no tensor read to the host per training step;
* ``test_order_independence``: first or last in the list trains the same weights;
* ``test_hook_exceptions_name_the_plugin``: an error raised in its hooks names it;
* ``test_documented_errors_are_clear``: its documented bad options are refused;
* ``test_two_processes_end_with_equal_weights`` (``slow``): 2 processes, accelerate.

``skip_checks = {"order": "why"}`` skips a check, with the reason shown by pytest.
The two-process check's worker is `hooktrain.conformance_worker`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hooktrain.conformance_support import (
    HostSyncCounter,
    Neighbour,
    StateAtFitEnd,
    TrainingJob,
    UnhandledSigterm,
    called_hooks,
    declared_plugin,
    fresh_selection,
    implemented_hooks,
    metric_differences,
    raise_on_entry,
    sigterm_guard,
    state_differences,
    weight_differences,
)
from hooktrain.errors import ResumeWarning

__all__ = ["CHECKS", "PluginConformance"]

#: The checks' names, as ``skip_checks`` keys.
CHECKS = ("resume", "host_sync", "order", "hook_errors", "documented_errors", "multiprocess")
#: The global step at which the resume check sends SIGTERM: mid-way through epoch 2.
KILL_STEP = 9
_GUIDE = "see docs/testing-a-plugin.md"


class PluginConformance:
    """Subclass it in a plugin's tests, setting ``plugin``; pytest runs the checks.

    :cvar plugin: the plugin, as ``Trainer(plugins=[...])`` takes it.
    :cvar skip_checks: check name (one of `CHECKS`) to the reason it does not apply.
    :cvar documented_errors: ``(options, regex)`` pairs: options the plugin documents
        as refused, and a regular expression its message must match. Needs ``plugin``
        given as a name, an import path or a class (options are applied to it).
    :cvar wall_clock_metrics: names (``fnmatch`` patterns) of values the plugin
        publishes that measure time (``samples_per_sec``): the resume check does not
        compare them.
    :cvar run_specific_state: paths (``fnmatch``, ``key/0/key``) of saved state that
        an interrupted run holds otherwise by design (a count of saves made).
    """

    plugin: Any = None
    skip_checks: Mapping[str, str] = {}
    documented_errors: Sequence[tuple[Mapping[str, Any], str]] = ()
    wall_clock_metrics: Sequence[str] = ()
    run_specific_state: Sequence[str] = ()

    @pytest.fixture(autouse=True)
    def _conformance_isolation(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[None]:
        # A check runs what it lists, nothing the environment or a project adds.
        for variable in ("HOOKTRAIN_PLUGINS", "HOOKTRAIN_DISABLE_PLUGINS", "HOOKTRAIN_TRACE"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.chdir(tmp_path)
        unknown = sorted(set(self.skip_checks) - set(CHECKS))
        if unknown:
            pytest.fail(f"skip_checks names unknown checks {unknown}; the checks are {CHECKS}")
        self._tmp = tmp_path
        self._monkeypatch = monkeypatch
        yield

    # ------------------------------------------------------------------ helpers

    def _skip_if_asked(self, check: str) -> None:
        reason = self.skip_checks.get(check)
        if reason:
            pytest.skip(f"{check} skipped by skip_checks: {reason}")

    def _fresh(self) -> Any:
        return fresh_selection(declared_plugin(type(self)))

    def _loaded(self) -> tuple[str, Any]:
        from hooktrain.plugins import resolve_plugins

        ((name, obj),) = resolve_plugins([self._fresh()])
        return name, obj

    def _job(self, folder: str) -> TrainingJob:
        workdir = self._tmp / folder
        workdir.mkdir(exist_ok=True)
        self._monkeypatch.chdir(workdir)
        return TrainingJob()

    # ------------------------------------------------------------------ (a) resume

    def test_exact_resume_after_sigterm(self) -> None:
        """Killed (SIGTERM, from the ``faults`` plugin) at global step 9 of 12, mid-epoch,
        then resumed with ``ckpt_path="last"``: the weights must be bit-identical to
        those of the same run never interrupted, and the values published at the end
        (``trainer.metrics``: losses, metrics, whatever a plugin logs) equal."""
        from hooktrain.plugins import exclusive_roles, installed_plugins

        self._skip_if_asked("resume")
        name, obj = self._loaded()
        companions: list[Any] = []
        if "checkpoint-io" not in exclusive_roles(name, obj):
            if "checkpoint" not in installed_plugins():
                pytest.skip(
                    "exact resume needs the checkpoint plugin to save and reload the run, "
                    "and hooktrain-checkpoint is not installed (pip install hooktrain-checkpoint)"
                )
            companions = [("checkpoint", {"dirpath": "conformance-ckpt", "async_save": False})]
        reference_job = self._job("uninterrupted")
        reference_state, resumed_state = StateAtFitEnd(name), StateAtFitEnd(name)
        reference = reference_job.fit([self._fresh(), *companions, reference_state])
        reference_values = reference_job.trainer.metrics.floats()
        fault = ("faults", {"hook": "on_train_batch_end", "step": KILL_STEP, "fault": "sigterm"})
        job = self._job("interrupted")
        with sigterm_guard():
            try:
                stopped = job.fit([self._fresh(), *companions, fault])
            except UnhandledSigterm:
                pytest.fail(
                    f"exact resume: SIGTERM at global step {KILL_STEP} reached no handler. "
                    f"The checkpoint-io plugin must save and stop on SIGTERM; a plugin must "
                    f"not replace or remove the process's SIGTERM handler. {_GUIDE}"
                )
        if job.trainer.global_step != KILL_STEP:
            pytest.fail(
                f"exact resume: after SIGTERM at global step {KILL_STEP} the run went on to "
                f"step {job.trainer.global_step} instead of saving and stopping there. A plugin "
                f"must not clear trainer.should_stop, nor keep the loop going. {_GUIDE}"
            )
        del stopped
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResumeWarning)
            try:
                resumed = job.fit([self._fresh(), *companions, resumed_state], ckpt_path="last")
            except ResumeWarning as doubt:
                pytest.fail(
                    f"exact resume: the run resumed from global step {KILL_STEP} warned "
                    f"that it may not replay the interrupted one: {str(doubt).rstrip('.')}. "
                    f"A plugin that replaces the training dataloader or its sampler must "
                    f"keep the same random generators in every epoch and process, or mark "
                    f"those it reseeds every epoch with hooktrain.rng.mark_epoch_seeded. "
                    f"{_GUIDE}"
                )
        differences = weight_differences(reference, resumed)
        if differences:
            hooks = implemented_hooks(obj)
            saved = {"on_save_checkpoint", "on_load_checkpoint"} & set(hooks)
            note = (
                f"{name!r} implements {' and '.join(sorted(saved))}"
                if saved
                else f"{name!r} implements neither on_save_checkpoint nor on_load_checkpoint"
            )
            pytest.fail(
                f"exact resume: a run stopped by SIGTERM at global step {KILL_STEP} (mid-epoch) "
                f"and resumed with ckpt_path='last' ends with other weights than the same run "
                f"uninterrupted ({differences}). Every piece of the plugin's state that changes "
                f"training (counters, schedules, random generators, running values) must be "
                f"written in on_save_checkpoint under checkpoint['plugins'][name] and read back "
                f"in on_load_checkpoint; {note}. {_GUIDE}"
            )
        differences = metric_differences(
            reference_values, job.trainer.metrics.floats(), self.wall_clock_metrics
        )
        if differences:
            pytest.fail(
                f"exact resume: a run stopped by SIGTERM at global step {KILL_STEP} (mid-epoch) "
                f"and resumed with ckpt_path='last' ends with the same weights but other "
                f"published values than the same run uninterrupted ({differences}). State "
                f"behind a value the plugin logs or changes (a counter, a running average, "
                f"weights it keeps aside) must be written in on_save_checkpoint under "
                f"checkpoint['plugins'][name] and read back in on_load_checkpoint. Values "
                f"that measure time are left out by listing them in wall_clock_metrics. "
                f"{_GUIDE}"
            )
        states = reference_state.state, resumed_state.state
        if differences := state_differences(*states, self.run_specific_state):
            pytest.fail(
                f"exact resume: the run resumed from global step {KILL_STEP} ends with the "
                f"same weights and values but another saved state of {name!r} than the same "
                f"run uninterrupted (checkpoint['plugins'][{name!r}] at {differences}): it "
                f"was not read back in on_load_checkpoint, or counted twice. List what "
                f"differs by design in run_specific_state. {_GUIDE}"
            )

    # ------------------------------------------------------------------ (b) host sync

    def test_no_host_sync_per_step(self) -> None:
        """Tensor-to-host reads (``.item()``, ``float()``, ``bool()``...) counted over
        runs of 8 and 16 training steps (same validation, no log interval reached)
        must not grow with the number of steps."""
        self._skip_if_asked("host_sync")
        counter = HostSyncCounter(self._monkeypatch)
        # No log interval inside either run: publishing step metrics reads them.
        quiet = {"log_every_n_steps": 1000}
        short = counter.count(lambda: self._job("short").fit([self._fresh()], steps=4, **quiet))
        long = counter.count(lambda: self._job("long").fit([self._fresh()], steps=8, **quiet))
        grown = {
            where: (short.get(where, 0), n) for where, n in long.items() if n > short.get(where, 0)
        }
        if grown:
            listed = "; ".join(
                f"{where}: {a} reads over 8 steps, {b} over 16" for where, (a, b) in grown.items()
            )
            pytest.fail(
                f"host sync per step: reads of a tensor to the host grew with the number of "
                f"training steps ({listed}). Each one makes the CPU wait for the device every "
                f"step. Keep values as tensors (trainer.log(name, tensor) stores them unread) "
                f"and read them at log intervals (log_metrics), epoch ends or checkpoints. "
                f"{_GUIDE}"
            )

    # ------------------------------------------------------------------ (c) order

    def test_order_independence(self) -> None:
        """Listed before and after a neighbour plugin that halves gradients in
        ``on_before_optimizer_step`` and draws from torch's global generator in
        ``on_train_batch_start``, the plugin must train the same weights and publish
        the same values (but those of ``wall_clock_metrics``)."""
        self._skip_if_asked("order")
        first_job = self._job("first")
        first = first_job.fit([self._fresh(), Neighbour()])
        last_job = self._job("last")
        last = last_job.fit([Neighbour(), self._fresh()])
        values = first_job.trainer.metrics.floats(), last_job.trainer.metrics.floats()
        differences = weight_differences(first, last) or metric_differences(
            *values, self.wall_clock_metrics, ("listed first", "listed last")
        )
        if differences:
            pytest.fail(
                f"order independence: listed first and listed last among other plugins, the "
                f"plugin trains other weights or publishes other values ({differences}). Its "
                f"hooks depend on what another plugin's implementation of the same hook did "
                f"before them (gradients changed, random numbers drawn from torch's global "
                f"generator). Mark the "
                f"implementations whose place matters @hookimpl(tryfirst=True) or "
                f"(trylast=True), use a generator of your own, or, if it must be listed at one "
                f"end, say so in skip_checks = {{'order': 'why'}} and in its docs. {_GUIDE}"
            )

    # ------------------------------------------------------------------ (e) failures

    def test_hook_exceptions_name_the_plugin(self) -> None:
        """An exception raised inside each of its hooks (injected as the hook is
        entered) must reach the caller as a ``HookError`` naming the plugin and hook."""
        from hooktrain.errors import HookError

        self._skip_if_asked("hook_errors")
        called = self._called_hooks()
        if not called:
            pytest.skip("none of the plugin's hooks is called in a fit")
        for hook, code, name in called:
            job = self._job(f"raise-in-{hook}")
            error: BaseException | None = None
            # The core reports a clean-up hook's own error on stderr, not raised.
            stderr = io.StringIO()
            with raise_on_entry(code), contextlib.redirect_stderr(stderr):
                try:
                    job.fit([self._fresh()], steps=2, epochs=1)
                except BaseException as exc:
                    error = exc
            broken = f"plugin {name!r} raised in hook 'on_exception'"
            if broken in stderr.getvalue():
                pytest.fail(
                    f"hook errors: after an exception inside {name!r}'s {hook}, its own "
                    f"on_exception raised ({stderr.getvalue().strip()}). Do not raise, nor "
                    f"end the process (sys.exit), from on_exception: report and return, "
                    f"the core re-raises. {_GUIDE}"
                )
            if not (isinstance(error, HookError) and (error.plugin, error.hook) == (name, hook)):
                got = "no error at all" if error is None else f"{type(error).__name__}: {error}"
                pytest.fail(
                    f"hook errors: an exception raised inside {name!r}'s {hook} must reach the "
                    f"user as a HookError naming {name!r} and {hook!r}; got {got}. Do not catch "
                    f"and hide exceptions in a hook or in a wrapper around other hooks, and do "
                    f"not end the process (sys.exit, os._exit) from on_exception: report and "
                    f"return, the core re-raises. {_GUIDE}"
                )

    def _called_hooks(self) -> list[tuple[str, Any, str]]:
        """(hook, code object, registered name) of each implementation of the plugin
        that a short fit calls (one run, recording)."""
        return called_hooks(self._job("hooks-called"), self._fresh())

    def test_documented_errors_are_clear(self) -> None:
        """Each ``documented_errors`` entry must be refused before any training step,
        with a message matching its pattern and naming the plugin."""
        import re

        from hooktrain.errors import HookError, HooktrainError

        self._skip_if_asked("documented_errors")
        if not self.documented_errors:
            pytest.skip(
                "no documented_errors declared: list ({bad options}, 'message regex') pairs "
                "to check that the errors your plugin documents are raised, and clearly"
            )
        raw = declared_plugin(type(self))
        target = raw[0] if isinstance(raw, tuple) else raw
        if not (isinstance(target, str) or inspect.isclass(target) or inspect.isroutine(target)):
            pytest.fail(
                "documented_errors needs plugin = a name, an import path or a class, to "
                "construct it with the bad options"
            )
        name, _ = self._loaded()
        for options, pattern in self.documented_errors:
            job = self._job("documented-error")
            try:
                # Recorded, so that an error raised inside the first step (where the
                # global step is still 0) is told from one raised before training.
                job.fit([(target, dict(options))], steps=2, epochs=1, record=True)
            except HooktrainError as exc:
                text = str(exc) + "".join(f"\n{n}" for n in getattr(exc, "__notes__", []))
                cause = exc.__cause__ if isinstance(exc, HookError) else None
                text += f"\n{cause}" if cause is not None else ""
                calls = [call.name for call in job.recorder.calls] if job.recorder else []
                wrong = []
                # Late once a training batch has started (the global step is still 0
                # throughout the first one).
                if "on_train_batch_start" in calls:
                    ended = calls.index("on_exception") if "on_exception" in calls else None
                    hook = getattr(exc, "hook", None) or calls[:ended][-1]
                    wrong.append(
                        f"it was raised after training began (in {hook!r}), where a user "
                        f"has lost the time until then: refuse it before the first step, "
                        f"in the constructor, setup or prepare"
                    )
                if not re.search(pattern, text):
                    wrong.append(f"its message does not match {pattern!r}")
                if name not in text:
                    wrong.append(f"its message does not name the plugin ({name!r})")
                if not wrong:
                    continue
                pytest.fail(
                    f"documented errors: options {dict(options)} were refused with "
                    f"{type(exc).__name__}: {text!r}, but " + "; and ".join(wrong) + f". {_GUIDE}"
                )
            except Exception as exc:
                pytest.fail(
                    f"documented errors: options {dict(options)} were refused with "
                    f"{type(exc).__name__}: {exc}; a refused option must raise a "
                    f"HooktrainError, which tells users a bad option from a bug: raise "
                    f"hooktrain.errors.ConfigurationError (a ValueError) naming the plugin "
                    f"({name!r}). {_GUIDE}"
                )
            pytest.fail(
                f"documented errors: options {dict(options)} were accepted and trained; the "
                f"plugin documents them as refused (matching {pattern!r}). Raise "
                f"ConfigurationError naming the plugin before training. {_GUIDE}"
            )

    # ------------------------------------------------------------------ (d) processes

    @pytest.mark.slow
    def test_two_processes_end_with_equal_weights(self) -> None:
        """The same job on 2 real processes (torchrun, gloo on the CPU) with the
        accelerate plugin: both ranks must end with equal weights."""
        from hooktrain.plugins import exclusive_roles, installed_plugins

        self._skip_if_asked("multiprocess")
        if "accelerate" not in installed_plugins():
            pytest.skip("needs hooktrain-accelerate (pip install hooktrain-accelerate)")
        name, obj = self._loaded()
        roles = set(exclusive_roles(name, obj))
        if "distributed" not in roles:
            accelerate = installed_plugins()["accelerate"].load()
            shared = sorted(roles & set(exclusive_roles("accelerate", accelerate)))
            if shared:
                pytest.skip(
                    f"{name!r} takes the exclusive role(s) {shared}, which accelerate takes "
                    f"too: the two cannot run together, and accelerate does that job itself"
                )
        module = sys.modules[type(self).__module__]
        out = self._tmp / "ranks"
        out.mkdir()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("HOOKTRAIN_")
        }
        env["OMP_NUM_THREADS"] = "1"
        command = [
            sys.executable,
            *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *("-m", "hooktrain.conformance_worker", str(module.__file__)),
            *(type(self).__name__, str(out)),
        ]
        # The timeout only keeps a hung collective from hanging the suite.
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=600, cwd=self._tmp
        )
        if done.returncode != 0:
            pytest.fail(
                f"two processes: the job failed on 2 processes with accelerate "
                f"(exit {done.returncode}). A plugin must run on every process (files and "
                f"output on trainer.is_global_zero only) and enter every collective on all "
                f"of them. {_GUIDE}\n{done.stderr[-4000:]}"
            )
        import torch

        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2], "the job did not run on 2 processes"
        differences = weight_differences(ranks[0]["weights"], ranks[1]["weights"])
        if differences:
            pytest.fail(
                f"two processes: rank 0 and rank 1 end with different weights "
                f"({differences}). Whatever the plugin changes in training must be the same on "
                f"every process: change gradients only before they are reduced, and the same "
                f"way on all ranks. {_GUIDE}"
            )
