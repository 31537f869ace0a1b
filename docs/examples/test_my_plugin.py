"""Testing a plugin with hooktrain.testing: a complete test module.

pytest finds the fixtures ``hooktrain_run`` and ``hook_recorder`` by itself: the
harness is a pytest plugin that hooktrain installs (entry point ``pytest11``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hooktrain import ConfigurationError, HookError, Trainer, hookimpl
from hooktrain.testing import HookRecorder, make_data, make_model, run


# --8<-- [start:plugin]
class LossGuard:
    """The plugin under test: stops the run when the epoch loss exceeds a limit."""

    name = "loss_guard"

    def __init__(self, limit: float) -> None:
        if limit <= 0:
            raise ConfigurationError(f"loss_guard: limit must be > 0, got {limit!r}")
        self.limit = limit
        self.tripped_at: int | None = None

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.metrics["loss"] > self.limit:
            self.tripped_at = trainer.current_epoch
            trainer.should_stop = True


# --8<-- [end:plugin]


# --8<-- [start:basic]
def test_does_nothing_while_the_loss_is_low(hooktrain_run) -> None:
    guard = LossGuard(limit=100.0)
    result = hooktrain_run([guard], max_epochs=3)  # a real fit, well under a second
    assert guard.tripped_at is None
    assert result.recorder.count("on_train_epoch_end") == 3
    assert result.trainer.current_epoch == 2


def test_stops_the_run(hooktrain_run) -> None:
    guard = LossGuard(limit=1e-6)
    result = hooktrain_run([guard], max_epochs=5)
    assert guard.tripped_at == 0
    # the recorder saw the loop end after the first epoch, without an exception
    names = result.recorder.names()
    assert names.count("on_train_epoch_start") == 1
    assert names[-2:] == ["on_fit_end", "teardown"]


# --8<-- [end:basic]


# --8<-- [start:arguments]
def test_what_the_plugin_saw(hooktrain_run) -> None:
    result = hooktrain_run([LossGuard(limit=100.0)], max_epochs=1, limit_train_batches=3)
    starts = result.recorder.of("on_train_batch_start")
    assert [call.kwargs["batch_idx"] for call in starts] == [0, 1, 2]
    inputs, targets = starts[0].kwargs["batch"]
    assert inputs.shape == (16, 8) and targets.shape == (16,)
    epoch_logs = [
        c.kwargs["metrics"]
        for c in result.recorder.of("log_metrics")
        if c.kwargs["scope"] == "epoch"
    ]
    assert set(epoch_logs[0]) == {"loss", "acc"}


# --8<-- [end:arguments]


# --8<-- [start:recorder]
def test_only_some_hooks_recorded_and_own_trainer(hook_recorder: HookRecorder) -> None:
    train, val = make_data(n=64, batch_size=32)
    trainer = Trainer(plugins=[LossGuard(limit=100.0), hook_recorder], max_epochs=2, device="cpu")
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert hook_recorder.count("optimizer_step") == 4  # 2 epochs x 2 batches
    epoch_only = HookRecorder(hooks=["on_train_epoch_end"])
    run([epoch_only], max_epochs=2, record=False)
    assert epoch_only.names() == ["on_train_epoch_end"] * 2


# --8<-- [end:recorder]


# --8<-- [start:errors]
def test_errors_name_the_plugin_and_the_hook(hooktrain_run) -> None:
    class Broken:
        name = "broken"

        @hookimpl
        def on_train_epoch_end(self, trainer: Trainer) -> None:
            raise RuntimeError("boom")

    with pytest.raises(HookError, match="plugin 'broken' raised in hook 'on_train_epoch_end'"):
        hooktrain_run([Broken()])


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="loss_guard: limit must be > 0"):
        Trainer(plugins=[(LossGuard, {"limit": 0})])


# --8<-- [end:errors]


# --8<-- [start:stages]
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_other_stages_never_stop(hooktrain_run, stage: str) -> None:
    guard = LossGuard(limit=1e-6)
    result = hooktrain_run([guard], stage=stage)
    assert guard.tripped_at is None
    assert result.recorder.names()[0] == "setup"


# --8<-- [end:stages]


# --8<-- [start:files]
def test_runs_in_a_fresh_directory(hooktrain_run, tmp_path: Path) -> None:
    class WritesAFile:
        @hookimpl
        def teardown(self, trainer: Trainer) -> None:
            Path("done.txt").write_text(str(trainer.global_step))

    result = hooktrain_run([WritesAFile()], max_epochs=1)
    # hooktrain_run changed into tmp_path, so relative paths land there
    assert (tmp_path / "done.txt").read_text() == str(result.trainer.global_step)


# --8<-- [end:files]
