"""Early stopping, tested through the public harness ``hooktrain.testing``."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hooktrain_early_stopping import EarlyStopping

from hooktrain import ConfigurationError, HookError, Trainer, hookimpl
from hooktrain.testing import HookRecorder, make_data, make_model, run


class ScriptedScore:
    """Logs ``val_score`` = ``values[epoch]`` at the end of each validation in fit,
    so a test decides exactly what early stopping sees."""

    name = "scripted"

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    @hookimpl
    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            trainer.log("val_score", self.values[trainer.current_epoch])


class SaveAndStopAt:
    """Writes ``trainer.dump_checkpoint()`` at the end of one epoch and interrupts
    the run there, as a preempted job would be (core API only)."""

    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch = epoch
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == self.epoch:
            torch.save(trainer.dump_checkpoint(), self.path)
            trainer.should_stop = True


# Lower is better; best 0.4 at epoch 3, then no improvement.
SCORES = [1.0, 0.5, 0.6, 0.4, 0.45, 0.47, 0.5, 0.52, 0.53, 0.55]


def epochs_trained(result) -> int:
    return result.recorder.count("on_train_epoch_end")


def test_stops_after_patience_checks_without_improvement() -> None:
    stopper = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    result = run([ScriptedScore(SCORES), stopper], max_epochs=10)
    # Epoch 3 is the best; the checks at epochs 4, 5 and 6 do not improve, and the
    # third of them reaches patience 3 (Lightning's and Keras's count).
    assert stopper.stopped_epoch == 6
    assert epochs_trained(result) == 7
    assert stopper.best == pytest.approx(0.4)
    assert result.trainer.should_stop
    assert result.recorder.count("on_fit_end") == 1
    assert "val_score did not improve on 0.4" in (stopper.stop_reason or "")


def test_patience_zero_stops_at_first_check_without_improvement() -> None:
    stopper = EarlyStopping(monitor="val_score", patience=0, verbose=False)
    run([ScriptedScore(SCORES), stopper], max_epochs=10)
    assert stopper.stopped_epoch == 2


def test_mode_max_and_min_delta() -> None:
    scores = [0.5, 0.6, 0.605, 0.61, 0.7, 0.7, 0.7]
    # With min_delta 0.02, 0.605 and 0.61 do not count as improving on 0.6.
    stopper = EarlyStopping(
        monitor="val_score", mode="max", patience=2, min_delta=0.02, verbose=False
    )
    run([ScriptedScore(scores), stopper], max_epochs=len(scores))
    assert stopper.stopped_epoch == 3
    assert stopper.best == pytest.approx(0.6)
    # Without min_delta every small gain counts: it stops only once 0.7 repeats.
    stopper = EarlyStopping(monitor="val_score", mode="max", patience=2, verbose=False)
    run([ScriptedScore(scores), stopper], max_epochs=len(scores))
    assert stopper.stopped_epoch == 6


def test_real_validation_loss_in_max_mode_stops_when_it_keeps_falling() -> None:
    # The tiny problem's val_loss falls every epoch, so in mode "max" nothing ever
    # improves on epoch 0: a real metric, read after validation, stops the run.
    stopper = EarlyStopping(monitor="val_loss", mode="max", patience=2, verbose=False)
    result = run([stopper], max_epochs=20)
    assert stopper.stopped_epoch == 2
    assert epochs_trained(result) == 3
    losses = [
        c.kwargs["metrics"]["val_loss"]
        for c in result.recorder.of("log_metrics")
        if c.kwargs["scope"] == "validate"
    ]
    assert losses == sorted(losses, reverse=True)
    assert stopper.best == pytest.approx(losses[0])


def test_a_training_metric_is_judged_every_epoch() -> None:
    stopper = EarlyStopping(monitor="loss", mode="max", patience=0, verbose=False)
    run([stopper], max_epochs=20, data=(make_data()[0], None))
    assert stopper.stopped_epoch == 1


def test_epochs_without_validation_are_not_judged_on_stale_values() -> None:
    scores = [1.0, 9.0, 0.5, 9.0, 0.6, 9.0, 0.7, 9.0, 0.8, 9.0]
    stopper = EarlyStopping(monitor="val_score", patience=0, verbose=False)
    result = run([ScriptedScore(scores), stopper], max_epochs=10, check_val_every_n_epoch=2)
    # Validation runs after epochs 1, 3, 5: scores 9.0 (best), 9.0 (no gain): stop at 3.
    assert stopper.stopped_epoch == 3
    assert result.recorder.count("on_validation_end") == 2


def test_a_missing_metric_names_the_plugin_and_the_metrics_available() -> None:
    with pytest.raises(HookError) as info:
        run([EarlyStopping(monitor="val_acuracy")], max_epochs=2)
    message = str(info.value)
    assert "'early_stopping'" in message and "on_validation_end" in message
    assert "not logged by the validation at epoch 0, step 8." in message
    assert "val_acuracy" in message and "val_acc" in message


def test_a_missing_training_metric_is_found_at_the_epochs_end() -> None:
    with pytest.raises(HookError) as info:
        run([EarlyStopping(monitor="los")], max_epochs=2)
    message = str(info.value)
    assert "on_train_epoch_end" in message and "not logged by the end of epoch 0." in message


@pytest.mark.parametrize(
    ("trainer_kwargs", "has_val", "why"),
    [
        ({}, False, "fit() was given no val_dataloaders"),
        ({"limit_val_batches": 0}, True, "limit_val_batches=0 turns validation off"),
        (
            {"check_val_every_n_epoch": 4},
            True,
            "validation never runs (check_val_every_n_epoch=4 exceeds max_epochs=3",
        ),
    ],
)
def test_a_validation_metric_in_a_fit_that_never_validates_is_refused_before_training(
    trainer_kwargs: dict, has_val: bool, why: str
) -> None:
    recorder = HookRecorder(["on_train_epoch_start"])
    train, val = make_data()
    with pytest.raises(HookError) as info:
        run(
            [EarlyStopping(monitor="val_loss", patience=0), recorder],
            record=False,
            max_epochs=3,
            data=(train, val if has_val else None),
            **trainer_kwargs,
        )
    assert recorder.count("on_train_epoch_start") == 0  # refused before any training
    assert info.value.hook == "on_fit_start"
    assert isinstance(info.value.__cause__, ConfigurationError)
    message = str(info.value)
    assert "early_stopping monitors 'val_loss', a validation metric" in message
    assert why in message


def test_a_validation_metric_is_accepted_when_only_step_wise_validation_runs() -> None:
    stopper = EarlyStopping(monitor="val_loss", mode="max", patience=0, verbose=False)
    run([stopper], max_epochs=3, check_val_every_n_epoch=4, val_every_n_steps=4)
    assert stopper.best is not None  # judged: step-wise validations count


class ScriptedPerValidation:
    """Logs ``val_score`` = ``values[n]`` at the ``n``-th validation in fit (from 0),
    at the epoch's end or at a step inside it."""

    name = "scripted_per_validation"

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.seen = 0

    @hookimpl
    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            trainer.log("val_score", self.values[self.seen])
            self.seen += 1


def test_every_step_wise_validation_is_judged() -> None:
    # make_data(): 8 steps an epoch; val_every_n_steps=2 validates at steps 2, 4, 6
    # and 8 of each epoch. As in Lightning, each validation is a check: the best
    # (1.0) is the first, and the third that does not beat it stops the run. Judged
    # only at epoch ends, the run went on for four epochs and never saw the 1.0.
    scores = [1.0] + [2.0] * 40
    stopper = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    result = run([ScriptedPerValidation(scores), stopper], max_epochs=10, val_every_n_steps=2)
    assert (stopper.best, stopper.wait, stopper.stopped_epoch) == (1.0, 3, 0)
    assert result.trainer.global_step == 8


class ScoreAtValidationEnd:
    """Logs ``val_score`` = ``values[epoch]`` in its own ``on_validation_end``."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            trainer.log("val_score", self.values[trainer.current_epoch])


@pytest.mark.parametrize("stopper_first", [True, False])
def test_a_value_another_plugin_logs_at_the_validations_end_is_judged(stopper_first) -> None:
    # Judged tryfirst in on_validation_end, it ran before the plugin that logs the
    # value there: a missing metric at the first check, a stale value after.
    stopper = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    plugins = [stopper, ScoreAtValidationEnd(SCORES)]
    run(plugins if stopper_first else plugins[::-1], max_epochs=10)
    assert (stopper.stopped_epoch, stopper.best) == (6, 0.4)


def test_a_nan_before_any_finite_value_is_no_improvement_without_check_finite() -> None:
    # With check_finite=False a NaN is a value that improves on nothing, as in
    # Lightning (whose best starts at +inf for "min"); taken as the first best, it
    # made every later value look worse and stopped a run that was improving.
    scores = [float("nan"), 0.5, 0.4, 0.3, 0.2, 0.1]
    stopper = EarlyStopping(monitor="val_score", patience=2, check_finite=False, verbose=False)
    run([ScriptedScore(scores), stopper], max_epochs=6)
    assert (stopper.stopped_epoch, stopper.best, stopper.wait) == (None, 0.1, 0)


def test_patience_runs_out_on_nans_alone_without_check_finite() -> None:
    stopper = EarlyStopping(monitor="val_score", patience=2, check_finite=False, verbose=False)
    run([ScriptedScore([float("nan")] * 4), stopper], max_epochs=4)
    assert (stopper.stopped_epoch, stopper.best) == (1, None)
    assert stopper.stop_reason == "val_score was NaN at 2 checks in a row (patience 2)"


def test_a_non_finite_value_stops_at_once() -> None:
    stopper = EarlyStopping(monitor="val_score", patience=5, verbose=False)
    run([ScriptedScore([1.0, float("nan"), 0.5, 0.4]), stopper], max_epochs=4)
    assert stopper.stopped_epoch == 1
    assert stopper.stop_reason == "val_score is nan"


def test_verbose_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run([ScriptedScore(SCORES), EarlyStopping(monitor="val_score", patience=3)], max_epochs=10)
    lines = [line for line in capsys.readouterr().err.splitlines() if "early stopping" in line]
    assert lines == [
        "hooktrain: early stopping at epoch 6: val_score did not improve on 0.4 for 3 checks "
        "(patience 3)"
    ]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"mode": "maximum"}, "mode must be 'min' or 'max'"),
        ({"patience": -1}, "patience must be an integer >= 0"),
        ({"patience": 1.5}, "patience must be an integer >= 0"),
        ({"min_delta": -0.1}, "min_delta must be >= 0"),
    ],
)
def test_bad_options_are_refused(options: dict, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Trainer(plugins=[("early_stopping", options)])


def test_selected_by_entry_point_name_with_options() -> None:
    result = run(
        [
            ScriptedScore(SCORES),
            ("early_stopping", {"monitor": "val_score", "patience": 3, "verbose": False}),
        ],
        max_epochs=10,
    )
    assert "early_stopping" in result.trainer.plugin_names
    assert epochs_trained(result) == 7


def test_standalone_validation_is_left_alone() -> None:
    stopper = EarlyStopping(patience=0, verbose=False)
    result = run([stopper], stage="validate")
    assert stopper.best is None and not result.trainer.should_stop


def test_a_second_fit_starts_afresh() -> None:
    stopper = EarlyStopping(monitor="val_score", patience=0, verbose=False)
    trainer = Trainer(plugins=[ScriptedScore(SCORES), stopper], max_epochs=10, device="cpu")
    train, val = make_data()
    for _ in range(2):
        trainer.fit(
            make_model(),
            train,
            val,
            loss_fn=torch.nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
        assert stopper.stopped_epoch == 2


# ---------------------------------------------------------------------- resume


def stop_epoch_of_uninterrupted_run() -> int:
    stopper = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    run([ScriptedScore(SCORES), stopper], max_epochs=10, seed=3)
    assert stopper.stopped_epoch is not None
    return stopper.stopped_epoch


def test_state_survives_a_resume_through_the_core_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "epoch4.pt"
    first = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    run([ScriptedScore(SCORES), first, SaveAndStopAt(4, path)], max_epochs=10, seed=3)
    assert first.wait == 1 and first.stopped_epoch is None  # interrupted, not stopped

    saved = torch.load(path, weights_only=True)
    assert saved["plugins"]["early_stopping"] == {
        "monitor": "val_score",
        "mode": "min",
        "best": pytest.approx(0.4),
        "wait": 1,
        "stopped_epoch": None,
        "stop_reason": None,
    }

    resumed = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    result = run(
        [ScriptedScore(SCORES), resumed], max_epochs=10, seed=3, fit_kwargs={"ckpt_path": path}
    )
    # Without the restored state the resumed run would take 0.45 (epoch 5) as a new
    # best and stop two epochs later than the uninterrupted run.
    assert resumed.stopped_epoch == stop_epoch_of_uninterrupted_run() == 6
    assert result.recorder.names().count("on_train_epoch_end") == 2  # epochs 5 and 6


def test_resuming_a_run_that_stopped_trains_no_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stopped.pt"

    class SaveAtStop:
        @hookimpl
        def on_train_epoch_end(self, trainer: Trainer) -> None:
            if trainer.should_stop:  # early stopping ran first (tryfirst)
                torch.save(trainer.dump_checkpoint(), path)

    run(
        [
            ScriptedScore(SCORES),
            EarlyStopping(monitor="val_score", patience=3, verbose=False),
            SaveAtStop(),
        ],
        max_epochs=10,
    )
    assert torch.load(path, weights_only=True)["plugins"]["early_stopping"]["stopped_epoch"] == 6
    result = run(
        [ScriptedScore(SCORES), EarlyStopping(monitor="val_score", patience=3, verbose=False)],
        max_epochs=10,
        fit_kwargs={"ckpt_path": path},
    )
    assert result.recorder.count("on_train_epoch_start") == 0
    assert result.recorder.count("on_fit_end") == 1
    # Said even with verbose off: a rerun with more epochs otherwise ends silently.
    assert "early_stopping stopped this run at epoch 6 (" in capsys.readouterr().err


def test_state_for_another_metric_is_not_restored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "epoch4.pt"
    run(
        [
            ScriptedScore(SCORES),
            EarlyStopping(monitor="val_score", patience=3, verbose=False),
            SaveAndStopAt(4, path),
        ],
        max_epochs=10,
    )
    other = EarlyStopping(monitor="val_loss", patience=50, verbose=False)
    run([ScriptedScore(SCORES), other], max_epochs=6, fit_kwargs={"ckpt_path": path})
    assert "starting afresh" in capsys.readouterr().err
    assert other.best is not None and other.best < 5  # a val_loss, never the 0.4 score


@pytest.mark.skipif(
    importlib.util.find_spec("hooktrain_checkpoint") is None,
    reason="the checkpoint plugin (plugins/checkpoint) is not installed",
)
def test_state_survives_a_resume_through_the_checkpoint_plugin(tmp_path: Path) -> None:
    options = {"dirpath": str(tmp_path / "ckpts")}
    first = EarlyStopping(monitor="val_score", patience=3, verbose=False)

    class StopAfter:
        @hookimpl(trylast=True)
        def on_train_epoch_end(self, trainer: Trainer) -> None:
            if trainer.current_epoch == 4:
                trainer.should_stop = True

    run([ScriptedScore(SCORES), first, ("checkpoint", options), StopAfter()], max_epochs=10)
    resumed = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    run(
        [ScriptedScore(SCORES), resumed, ("checkpoint", options)],
        max_epochs=10,
        fit_kwargs={"ckpt_path": "last"},
    )
    assert resumed.stopped_epoch == 6
    reason = resumed.stop_reason
    assert reason is not None and reason.startswith("val_score did not improve")
    # Rerun once finished: nothing left to train, and the stop is still explained.
    again = EarlyStopping(monitor="val_score", patience=3, verbose=False)
    run(
        [ScriptedScore(SCORES), again, ("checkpoint", options)],
        max_epochs=10,
        fit_kwargs={"ckpt_path": "last"},
    )
    assert (again.stopped_epoch, again.stop_reason) == (6, reason)


class SaveAndDieAtLastBatch:
    """Saves at the end of epoch ``epoch``'s last batch (after a step-wise
    validation there) and dies before that epoch's end, as a killed job would."""

    def __init__(self, epoch: int, batches: int, path: Path) -> None:
        self.epoch, self.batches, self.path = epoch, batches, path

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == self.epoch and trainer.epoch_batches_done == self.batches:
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("killed")


def test_a_resume_judges_an_epoch_whose_step_wise_validation_came_before_the_checkpoint(
    tmp_path: Path,
) -> None:
    # Validated at each epoch's last step (val_every_n_steps), saved there, killed
    # before the epoch's end: the resumed run does not validate those weights again,
    # and its early stopping skipped judging the epoch, stopping one epoch late.
    options = {"max_epochs": 10, "val_every_n_steps": 8, "check_val_every_n_epoch": 2}

    def fit(plugins, ckpt_path=None) -> EarlyStopping:
        stopper = EarlyStopping(monitor="val_score", patience=3, verbose=False)
        fit_kwargs = {"ckpt_path": ckpt_path}  # 8 steps an epoch, of make_data()'s 128
        run([ScriptedScore(SCORES), stopper, *plugins], fit_kwargs=fit_kwargs, **options)
        return stopper

    path = tmp_path / "epoch4.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([SaveAndDieAtLastBatch(4, 8, path)])
    assert fit([]).stopped_epoch == fit([], ckpt_path=path).stopped_epoch == 6


def test_an_unsuffixed_name_with_several_validation_loaders_suggests_the_per_loader_one() -> None:
    # With two validation loaders every validation metric is logged per loader; the
    # bare name's closest match by spelling alone was 'loss'.
    train, val = make_data()
    with pytest.raises(HookError) as info:
        run(
            [EarlyStopping(monitor="val_loss")],
            record=False,
            max_epochs=2,
            data=(train, [val, val]),
        )
    assert isinstance(info.value.__cause__, ConfigurationError)
    assert "Did you mean 'val_loss/dataloader_idx_0'? Metrics available: acc, loss, " in str(
        info.value
    )
