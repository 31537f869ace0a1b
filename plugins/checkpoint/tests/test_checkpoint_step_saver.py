"""Step-wise saving: a plugin of its own, registered for a fit only when
``every_n_train_steps`` is set, so that saving per epoch adds no call per step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint

from hooktrain import PluginError, Trainer, hookimpl
from hooktrain.errors import NonFiniteLossError
from hooktrain.testing import make_data, make_model


def fit(*plugins: Any, batches: int) -> Trainer:
    """One epoch of ``batches`` steps."""
    trainer = Trainer(
        plugins=list(plugins), max_epochs=1, limit_train_batches=batches, device="cpu"
    )
    trainer.fit(
        make_model(),
        make_data(n=64, batch_size=16)[0],
        loss_fn=F.cross_entropy,
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
    )
    return trainer


def _per_step_implementers(trainer: Trainer) -> list[str]:
    hook = trainer.plugin_manager.hook.on_train_batch_end
    return [trainer.plugin_manager.get_name(impl.plugin) for impl in hook.get_hookimpls()]


class PerStepImplementers:
    """Notes which plugins implement on_train_batch_end once the fit has started
    (after every setup, when the loop has looked up its hooks)."""

    name = "per_step_implementers"

    def __init__(self) -> None:
        self.seen: list[str] | None = None

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self.seen = _per_step_implementers(trainer)


@pytest.mark.parametrize("by_name", [False, True])
def test_only_step_wise_saving_adds_a_hook_per_step(tmp_path: Path, by_name: bool) -> None:
    # Any on_train_batch_end implementation costs a call per step and the core's
    # lean batch loop; a checkpoint saved per epoch needs neither.
    def implementers(**options: Any) -> tuple[list[str] | None, list[str]]:
        """(during the fit, after it)"""
        options["dirpath"] = os.fspath(tmp_path / str(len(list(tmp_path.iterdir()))))
        plugin = ("checkpoint", options) if by_name else ModelCheckpoint(**options)
        probe = PerStepImplementers()
        trainer = fit(plugin, probe, batches=4)
        return probe.seen, _per_step_implementers(trainer)

    assert implementers() == ([], [])
    assert implementers(every_n_epochs=2, save_on_sigterm=True) == ([], [])
    # The step-wise saver is a plugin of the fit, gone when it ends.
    assert implementers(every_n_train_steps=3) == (["checkpoint.steps"], [])


def test_every_n_train_steps_set_after_construction_is_used(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    checkpoint.every_n_train_steps = 2
    fit(checkpoint, batches=4)
    found = {path.name for path in tmp_path.iterdir()}
    assert found == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"}


def test_a_nan_loss_leaves_the_last_good_checkpoint_on_disk(tmp_path: Path) -> None:
    # Kept by recency (save_top_k=1, no monitor), a save of the weights a NaN trained
    # would have replaced step 2's file, and "last" would resume into the NaN.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    nan = ("faults", {"hook": "forward_step", "step": 3, "fault": "nan_loss"})
    with pytest.raises(NonFiniteLossError, match="checkpoint due at global step 4"):
        fit(checkpoint, nan, batches=4)
    assert {path.name for path in tmp_path.iterdir()} == {"epoch=0-step=2.ckpt", "last.ckpt"}
    # The ranking names the files on disk, not the save that was refused.
    assert checkpoint.best_k_models == {"epoch=0-step=2.ckpt": 2.0}
    assert Path(checkpoint.best_model_path).exists()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["progress"]["global_step"] == 2
    assert all(torch.isfinite(value).all() for value in last["model"].values())


class LogsPerStep:
    """Logs a chosen value of ``chosen`` in its on_train_batch_end, listed after the
    checkpoint plugin."""

    name = "logs_per_step"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        trainer.log("chosen", self.values[trainer.global_step - 1])


def test_a_step_wise_save_comes_after_the_other_plugins_step_end(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, monitor="chosen", filename="{step}-{chosen}"
    )
    fit(checkpoint, LogsPerStep([3.0, 1.0, 2.0]), batches=3)
    # Each save read the value logged at its own step.
    assert checkpoint.best_k_models == {"step=2-chosen=1.0.ckpt": 1.0}


def test_the_profile_plugin_times_step_wise_saving(tmp_path: Path) -> None:
    # The profile plugin wraps, in its setup (tryfirst), the implementations
    # registered by then; the step saver must already be one of them, even with
    # the profile plugin listed first.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)
    trainer = fit(("profile", {"print_report": False}), checkpoint, batches=3)
    report = trainer.plugin_manager.get_plugin("profile").report
    calls = {(row.hook, row.plugin): row.calls for row in report.rows}
    assert calls[("on_train_batch_end", "checkpoint.steps")] == 3


class NamedLikeTheSaver:
    name = "checkpoint.steps"

    @hookimpl
    def on_fit_start(self) -> None:
        pass


def test_a_saver_that_cannot_be_registered_fails_the_fit_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)
    with pytest.raises(PluginError, match=r"'checkpoint\.steps' cannot be registered"):
        fit(checkpoint, NamedLikeTheSaver(), batches=1)
    # teardown had nothing of its own to unregister
    assert "teardown raised" not in capsys.readouterr().err
