"""The ``faults`` plugin: options refused before training, and each fault as it
really happens (real signals to a real process, a real exception, a real NaN)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hooktrain import Trainer
from hooktrain.errors import ConfigurationError, HookError, NonFiniteLossError
from hooktrain.faults import InjectedFault
from hooktrain.plugins import installed_plugins
from hooktrain.testing import run


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"hook": "on_train_batch_ned", "step": 1, "fault": "sigterm"},
            "hook 'on_train_batch_ned' is not a hooktrain hook; did you mean 'on_train_batch_end'?",
        ),
        ({"hook": "on_train_batch_end", "step": 1, "fault": "segfault"}, "fault must be one of"),
        ({"hook": "on_train_batch_end", "step": -1, "fault": "sigkill"}, "step must be an integer"),
        ({"hook": "on_fit_start", "step": 0, "fault": "exception", "rank": "0"}, "rank must be"),
        (
            {"hook": "on_train_batch_end", "step": 1, "fault": "nan_loss"},
            "needs hook='forward_step'",
        ),
    ],
)
def test_bad_options_are_refused_when_the_trainer_is_built(options, message) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("?", r"\?")):
        Trainer(plugins=[("faults", options)], device="cpu")


def test_an_exception_comes_from_the_named_hook_at_the_named_step() -> None:
    fault = ("faults", {"hook": "on_train_batch_end", "step": 3, "fault": "exception"})
    with pytest.raises(HookError) as info:
        run([fault], max_epochs=2, record=False)
    error = info.value
    assert (error.plugin, error.hook) == ("faults", "on_train_batch_end")
    assert "global step 3" in str(error)
    assert isinstance(error.__cause__, InjectedFault)


def test_nan_loss_makes_that_steps_loss_nan_and_the_finite_check_stops_the_run() -> None:
    fault = ("faults", {"hook": "forward_step", "step": 2, "fault": "nan_loss"})
    # Injected at global step 2 (two steps taken); the third step is not taken.
    with pytest.raises(
        NonFiniteLossError, match="global step 2: the step that would have made it 3"
    ):
        run([fault], max_epochs=1, record=False, check_finite_every_step=True)


def test_a_fault_aimed_at_a_step_never_reached_is_reported(capsys) -> None:
    fault = ("faults", {"hook": "on_train_batch_end", "step": 999, "fault": "exception"})
    result = run([fault], max_epochs=1, record=False)
    assert result.trainer.global_step == 8
    assert "the fault 'exception' never fired" in capsys.readouterr().err


def test_a_rank_the_run_does_not_have_is_refused_when_the_stage_starts() -> None:
    from hooktrain import hookimpl

    class TwoProcesses:
        # Only what the check reads: a real second process is not needed to refuse
        # a rank the run does not have. Listed after faults: the check waits for it.
        @hookimpl
        def setup(self, trainer):
            trainer.world_size = 2

    fault = ("faults", {"hook": "on_train_batch_end", "step": 1, "fault": "exception", "rank": 2})
    with pytest.raises(HookError, match="rank=2, but the run has 2 processes"):
        run([fault, TwoProcesses()], max_epochs=1, record=False)


def test_a_rank_the_run_does_not_have_is_refused_on_one_process_too() -> None:
    # It was checked only with several processes: alone, the fault never fired and
    # nothing said so (the "never fired" notice is printed by the fault's rank).
    fault = ("faults", {"hook": "on_train_batch_end", "step": 1, "fault": "exception", "rank": 1})
    with pytest.raises(HookError, match=r"rank=1, but the run has 1 process$"):
        run([fault], max_epochs=1, record=False)


def test_another_ranks_fault_does_not_fire_here() -> None:
    from hooktrain import hookimpl

    class FirstOfTwo:
        # This process as rank 0 of two, whose twin (rank 1) sees exactly what it
        # sees: no second process is needed to see that rank 1's fault leaves this
        # one alone.
        @hookimpl
        def setup(self, trainer):
            trainer.world_size = 2

        @hookimpl
        def all_reduce(self, tensor):
            return tensor * 2

        @hookimpl
        def all_gather_object(self, obj):
            return [obj, obj]

    fault = ("faults", {"hook": "on_train_batch_end", "step": 1, "fault": "exception", "rank": 1})
    assert run([fault, FirstOfTwo()], max_epochs=1, record=False).trainer.global_step == 8


# A user's training script, unchanged between the runs: the fault comes from outside
# (HOOKTRAIN_PLUGINS=faults, with its options in the project's pyproject.toml).
SCRIPT = """
import sys
import torch
import torch.nn.functional as F
from hooktrain import Trainer
from hooktrain.testing import make_data, make_model

trainer = Trainer(plugins=[("checkpoint", {"dirpath": "ckpt", "async_save": False})],
                  max_epochs=2, seed=0)
model = make_model(dropout=0.2)
train, val = make_data(n=96, batch_size=16)  # 6 batches an epoch
trainer.fit(model, train, val, loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01), ckpt_path="last")
print(f"finished global_step={trainer.global_step} should_stop={trainer.should_stop}")
if not trainer.should_stop:
    torch.save(model.state_dict(), sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.skipif("checkpoint" not in installed_plugins(), reason="needs hooktrain-checkpoint")
def test_sigterm_at_step_5_saves_stops_there_and_the_rerun_is_bit_identical(
    tmp_path: Path,
) -> None:
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.hooktrain.plugin-options.faults]
            hook = "on_train_batch_end"
            step = 5
            fault = "sigterm"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKTRAIN_")}

    def train(folder: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        cwd = tmp_path / folder
        cwd.mkdir(exist_ok=True)
        extra = {"HOOKTRAIN_PLUGINS": "faults"} if fault else {}
        if fault == "sigkill":
            (cwd / "pyproject.toml").write_text(
                (tmp_path / "pyproject.toml").read_text().replace("sigterm", "sigkill")
            )
        return subprocess.run(
            [sys.executable, str(tmp_path / "train.py"), str(cwd / "final.pt")],
            cwd=cwd,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )

    reference = train("reference")
    assert reference.returncode == 0, reference.stderr
    assert "finished global_step=12 should_stop=False" in reference.stdout

    stopped = train("preempted", fault="sigterm")
    assert stopped.returncode == 0, stopped.stderr
    assert "sending SIGTERM at hook on_train_batch_end, global step 5" in stopped.stderr
    assert "finished global_step=5 should_stop=True" in stopped.stdout
    assert "SIGTERM received; saved" in stopped.stderr
    rerun = train("preempted")
    assert rerun.returncode == 0, rerun.stderr
    assert "finished global_step=12 should_stop=False" in rerun.stdout

    killed = train("killed", fault="sigkill")
    assert killed.returncode == -9, killed.stderr
    assert "sending SIGKILL at hook on_train_batch_end, global step 5" in killed.stderr

    expected = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "preempted" / "final.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), f"{name} differs after the resume"
