"""The helpers the logger plugins share (`hooktrain.loggers`)."""

from __future__ import annotations

import importlib.util
import re
import threading
from pathlib import Path

import pytest

import hooktrain.loggers as loggers
from hooktrain import ConfigurationError, Trainer
from hooktrain.loggers import (
    FlushSchedule,
    LoggedSteps,
    collect_hparams,
    experiment_dir,
    hparam_value,
    load_state,
    metric_key,
    new_version_dir,
    save_state,
    version_dir,
)
from hooktrain.testing import make_model


def test_experiment_dir() -> None:
    assert experiment_dir("runs", "exp") == Path("runs/exp")
    assert experiment_dir("runs", "") == Path("runs")


def test_the_next_version_follows_the_highest_folder(tmp_path: Path) -> None:
    assert new_version_dir(tmp_path / "new") == tmp_path / "new" / "version_0"
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_9").touch()  # a file, not a run folder
    (tmp_path / "version_x").mkdir()
    claimed = new_version_dir(tmp_path)
    assert claimed == tmp_path / "version_4"
    assert claimed.is_dir()


def test_runs_started_together_get_different_versions(tmp_path: Path) -> None:
    claimed: list[Path] = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        claimed.append(new_version_dir(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(path.name for path in claimed) == [f"version_{n}" for n in range(8)]


def test_a_fixed_version(tmp_path: Path) -> None:
    assert version_dir(tmp_path, 3) == tmp_path / "version_3"
    assert version_dir(tmp_path, "baseline") == tmp_path / "baseline"
    assert not (tmp_path / "version_3").exists()
    assert version_dir(tmp_path, None) == tmp_path / "version_0"


def test_hparams_from_trainer_model_and_option() -> None:
    trainer = Trainer(plugins=[], max_epochs=3, seed=1, device="cpu")
    trainer.module = make_model()
    assert collect_hparams(trainer)["max_epochs"] == 3
    trainer.module.hparams = {"hidden": 16, "seed": 99}
    params = collect_hparams(trainer, {"hidden": 32, "arch": [8, 16]})
    assert params["max_epochs"] == 3
    assert params["seed"] == 99  # the model's value wins over the trainer's
    assert params["hidden"] == 32  # the option's over the model's
    assert params["arch"] == [8, 16]
    trainer.module.hparams = "not a mapping"
    assert "hidden" not in collect_hparams(trainer)


def test_hparam_value() -> None:
    assert hparam_value(True) is True
    assert hparam_value(0.5) == 0.5
    assert hparam_value([8, 16]) == "8, 16"
    assert hparam_value(None) == "None"


def test_metric_key() -> None:
    assert metric_key("loss", "step") == "loss"
    assert metric_key("loss", "epoch") == "loss_epoch"
    assert metric_key("val_loss", "validate") == "val_loss"
    assert metric_key("val_loss", "epoch") == "val_loss"
    assert metric_key("test_acc", "test") == "test_acc"


def test_state_under_the_registered_name() -> None:
    class Logger:
        name = "mylogger"

    plugin = Logger()
    trainer = Trainer(plugins=[plugin], device="cpu")
    checkpoint: dict = {"plugins": {}}
    assert load_state(trainer, plugin, checkpoint) is None
    save_state(trainer, plugin, checkpoint, {"version": "version_2"})
    assert checkpoint["plugins"] == {"mylogger": {"version": "version_2"}}
    assert load_state(trainer, plugin, checkpoint) == {"version": "version_2"}
    assert load_state(trainer, plugin, {}) is None


def test_logged_steps_drop_what_each_key_holds() -> None:
    held = LoggedSteps.from_records([("loss", 3), ("loss", 11), ("loss_epoch", 8), ("loss", 5)])
    assert held.last == {"loss": 11, "loss_epoch": 8}
    # Step 11: the loss is held, the epoch's mean is not.
    assert held.fresh({"loss": 0.5, "loss_epoch": 0.4}, 11) == {"loss_epoch": 0.4}
    assert held.fresh({"loss": 0.3}, 12) == {"loss": 0.3}
    assert held.fresh({"loss": 0.3}, 12) == {}
    assert LoggedSteps().fresh({"loss": 1.0}, 0) == {"loss": 1.0}


def test_logged_steps_past_the_resume_are_held_one_by_one() -> None:
    # The crashed run logged every 2nd step up to 22 after its checkpoint at 18; the
    # resume logs every step. By the last step alone, 19 and 21 were dropped.
    records = [("loss", step) for step in range(2, 23, 2)]
    held = LoggedSteps.from_records(records, after=18)
    assert held.last == {"loss": 18}
    published = [step for step in range(17, 26) if held.fresh({"loss": 0.5}, step)]
    assert published == [19, 21, 23, 24, 25]


def test_flush_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = FlushSchedule(flush_secs=3600, max_queue=3)
    assert not schedule.due("step", 2)
    assert schedule.due("step", 3)
    monkeypatch.setattr(loggers, "EPOCH_FLUSH_MIN_S", 0.0)
    assert schedule.due("epoch", 1)
    assert not schedule.due("validate", 1)
    monkeypatch.setattr(loggers, "EPOCH_FLUSH_MIN_S", 3600.0)
    schedule.done()
    assert not schedule.due("epoch", 1)
    # The publication right after a checkpoint is written at once, and only that one.
    schedule.checkpointed()
    assert schedule.due("step", 1)
    schedule.done()
    assert not schedule.due("step", 1)
    for bad in ({"flush_secs": 0}, {"max_queue": 0}, {"max_queue": True}):
        with pytest.raises(ValueError):
            FlushSchedule(**bad)


def test_checkpoint_files_of_plugins_that_keep_checkpoints(tmp_path: Path) -> None:
    class Keeper:
        def __init__(self, name: str, last: object, best: object) -> None:
            self.name, self.last_model_path, self.best_model_path = name, last, best

    class Unrelated:
        name = "unrelated"
        last_model_path = str(tmp_path / "other.ckpt")  # no best_model_path: not a keeper

    for name in ("last.ckpt", "best.ckpt", "other.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sharded.ckpt").mkdir()  # a sharded checkpoint is a directory
    plugins = [
        Keeper("a", tmp_path / "last.ckpt", str(tmp_path / "best.ckpt")),
        Keeper("b", str(tmp_path / "last.ckpt"), None),  # the same file again
        Keeper("c", tmp_path / "missing.ckpt", tmp_path / "best.ckpt"),
        Keeper("d", tmp_path / "sharded.ckpt", None),
        Unrelated(),
    ]
    trainer = Trainer(plugins=plugins, device="cpu")
    found = loggers.checkpoint_files(trainer)
    assert sorted(found) == [tmp_path / n for n in ("best.ckpt", "last.ckpt", "sharded.ckpt")]
    assert loggers.checkpoint_files(Trainer(plugins=[], device="cpu")) == []


@pytest.mark.parametrize(
    ("plugin", "options", "message"),
    [
        ("tensorboard", {"log_lr": "no"}, "tensorboard: log_lr must be True or False, got 'no'"),
        ("csv", {"log_hparams": "false"}, "csv: log_hparams must be True or False"),
        ("csv", {"hparams": ["ab", "c"]}, "csv: hparams must be a dict of names to values"),
        ("tensorboard", {"hparams": 3}, "tensorboard: hparams must be a dict"),
        pytest.param(
            "mlflow",
            {"log_checkpoints": "yes"},
            "mlflow: log_checkpoints must be True or False",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("hooktrain_mlflow") is None, reason="mlflow plugin"
            ),
        ),
    ],
)
def test_a_loggers_flags_and_hparams_are_checked_when_it_is_built(plugin, options, message):
    # The strings "no" and "false" are true: they did the opposite of what they said.
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Trainer(plugins=[(plugin, options)])


def test_hparams_as_pairs_are_taken_as_dict_takes_them(tmp_path) -> None:
    csv = pytest.importorskip("hooktrain_csv")
    assert csv.CSVLogger(tmp_path, hparams=[("dataset", "digits")]).extra_hparams == {
        "dataset": "digits"
    }
