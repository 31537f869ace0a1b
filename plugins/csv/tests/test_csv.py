"""``metrics.csv`` read back with ``csv.DictReader`` and ``pandas.read_csv``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas
import pytest
import torch
import torch.nn.functional as F
from hooktrain_csv import CSVLogger, read_logged_steps

from hooktrain import Trainer, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data, make_model, run

# 128 samples in batches of 16: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8
SCRIPT = Path(__file__).with_name("killed_run.py")


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def cells(path: Path) -> dict[tuple[str, int], float]:
    """(column, step) to value, failing on a pair that appears twice."""
    found: dict[tuple[str, int], float] = {}
    for row in rows(path):
        for key, value in row.items():
            if key not in ("step", "epoch") and value != "":
                pair = (key, int(row["step"]))
                assert pair not in found, f"{pair} written twice"
                found[pair] = float(value)
    return found


def test_selected_by_entry_point_name() -> None:
    assert installed_plugins()["csv"].value == "hooktrain_csv:CSVLogger"


def test_one_row_per_publication_readable_by_dictreader_and_pandas(tmp_path: Path) -> None:
    result = run([("csv", {"log_dir": tmp_path, "name": "exp"})], max_epochs=2, log_every_n_steps=4)
    path = tmp_path / "exp" / "version_0" / "metrics.csv"
    published = [call.kwargs for call in result.recorder.of("log_metrics")]
    # Every 4 steps, then per epoch: validation, then the epoch's means.
    assert [(p["scope"], p["step"]) for p in published] == [
        ("step", 4), ("step", 8), ("validate", 8), ("epoch", 8),
        ("step", 12), ("step", 16), ("validate", 16), ("epoch", 16),
    ]  # fmt: skip

    by_dictreader = rows(path)
    assert len(by_dictreader) == len(published)
    frame = pandas.read_csv(path)
    assert list(frame.columns[:2]) == ["step", "epoch"]
    assert {"loss", "val_loss", "val_acc", "loss_epoch", "acc_epoch"} <= set(frame.columns)
    assert frame["step"].tolist() == [p["step"] for p in published]
    assert frame["epoch"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for index, publication in enumerate(published):
        suffix = "_epoch" if publication["scope"] == "epoch" else ""
        written = {
            key: float(value)
            for key, value in by_dictreader[index].items()
            if key not in ("step", "epoch") and value != ""
        }
        assert written == {name + suffix: value for name, value in publication["metrics"].items()}
        assert frame.iloc[index].dropna().drop(["step", "epoch"]).to_dict() == written
    # The last row is what the trainer holds now.
    assert frame["loss_epoch"].dropna().iloc[-1] == pytest.approx(result.trainer.metrics["loss"])


class LogLate:
    """Logs ``late`` from the second epoch on, and ``later`` in the third."""

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch >= 1:
            trainer.log("late", float(trainer.global_step))
        if trainer.current_epoch >= 2:
            trainer.log("later", 1.5)


def test_a_later_column_widens_the_header_and_keeps_every_row(tmp_path: Path) -> None:
    # max_queue=1 writes each row as published: every new column meets a file that
    # already has rows.
    run(
        [("csv", {"log_dir": tmp_path, "max_queue": 1}), LogLate()],
        max_epochs=3,
        log_every_n_steps=2,
        record=False,
    )
    path = tmp_path / "default" / "version_0" / "metrics.csv"
    header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "loss"]
    assert header.index("late") < header.index("later")
    frame = pandas.read_csv(path)
    # 4 step rows, a validation row and an epoch row per epoch.
    assert len(frame) == 3 * 6
    assert frame["step"].iloc[0] == 2
    assert frame["late"].dropna().index.min() == 6  # the first step row of epoch 1
    late_steps = frame.dropna(subset=["late"])
    assert (late_steps["late"] == late_steps["step"]).all()  # the value logged at each step
    assert frame["later"].notna().sum() == 4  # the step rows of the third epoch
    assert frame["later_epoch"].notna().sum() == 1  # and its mean, at its end


def test_versions_and_hparams(tmp_path: Path) -> None:
    model = make_model()
    model.hparams = {"hidden": 16, "dropout": 0.0}  # as Lightning's save_hyperparameters
    logger = CSVLogger(tmp_path, name="exp", hparams={"arch": [8, 16]})
    for expected in ("version_0", "version_1"):
        result = run([logger], model=model, max_epochs=1, record=False)
        assert logger.run_dir == tmp_path / "exp" / expected
        assert result.trainer.metrics["loss"] > 0
    params = json.loads((tmp_path / "exp" / "version_1" / "hparams.json").read_text())
    assert params["max_epochs"] == 1
    assert params["plugins"] == ["csv"]
    assert params["hidden"] == 16
    assert params["arch"] == [8, 16]
    assert params["max_steps"] is None


def test_only_the_global_zero_process_writes(tmp_path: Path) -> None:
    class RankOne:
        @hookimpl(tryfirst=True)
        def setup(self, trainer: Trainer) -> None:
            trainer.global_rank = 1

    logger = CSVLogger(tmp_path)
    run([RankOne(), logger], record=False)
    assert list(tmp_path.iterdir()) == []
    assert logger.run_dir is None


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="flush_secs"):
        CSVLogger(flush_secs=0)
    with pytest.raises(ValueError, match="max_queue"):
        CSVLogger(max_queue=0)
    for version in (-1, True, 1.5, ""):
        with pytest.raises(ValueError, match="version"):
            CSVLogger(version=version)


def _script(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(SCRIPT),
        "--log-dir",
        str(tmp_path / f"{name}-logs"),
        "--ckpt-dir",
        str(tmp_path / f"{name}-ckpt"),
        *extra,
    ]
    # The timeout only keeps a hung run from hanging the suite.
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("max_queue", "on_disk_at_kill"),
    [
        # Every row written as published: the killed run wrote steps 10 and 11, past
        # its last checkpoint (step 9), which the resumed run must not write again.
        (1, 11),
        # Rows waiting: written at the checkpoint of step 9 and with the publication
        # right after it (step 9's own); steps 10 and 11 die with the process and
        # the resumed run writes them.
        (1000, 9),
    ],
)
def test_a_killed_then_resumed_run_writes_every_step_once(
    tmp_path: Path, max_queue: int, on_disk_at_kill: int
) -> None:
    # The undisturbed run, in this process (the same computation as in a child).
    spec = importlib.util.spec_from_file_location("csv_killed_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train(str(tmp_path / "reference-logs"), str(tmp_path / "reference-ckpt"))
    queue = ("--max-queue", str(max_queue))
    killed = _script(tmp_path, "run", "--kill-at", "12", *queue)
    assert killed.returncode == -9, killed.stderr
    path = tmp_path / "run-logs" / "default" / "version_0" / "metrics.csv"
    last_checkpoint = torch.load(tmp_path / "run-ckpt" / "last.ckpt", weights_only=True)
    assert last_checkpoint["progress"]["global_step"] == 9
    assert read_logged_steps(path).last["loss"] == on_disk_at_kill

    resumed = _script(tmp_path, "run", *queue)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["version_0"]
    written = cells(path)  # fails on a (column, step) written twice
    assert sorted(step for key, step in written if key == "loss") == list(range(1, 25))
    assert sorted(step for key, step in written if key == "loss_epoch") == [8, 16, 24]
    # Exact resume: the same values as the undisturbed run's, none missing.
    assert written == cells(tmp_path / "reference-logs" / "default" / "version_0" / "metrics.csv")
    assert pandas.read_csv(path)["step"].is_monotonic_increasing


def test_a_test_after_fit_writes_into_the_fits_file(tmp_path: Path) -> None:
    result = run([("csv", {"log_dir": tmp_path})], max_epochs=1, record=False)
    scores = result.trainer.test(result.model, make_data()[1], loss_fn=F.cross_entropy)
    frame = pandas.read_csv(tmp_path / "default" / "version_0" / "metrics.csv")
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["version_0"]
    last = frame.iloc[-1]
    assert last["test_loss"] == pytest.approx(scores["test_loss"])
    assert last["step"] == 8


def test_a_fixed_version_starts_its_file_anew(tmp_path: Path) -> None:
    for epochs in (2, 1):
        run([("csv", {"log_dir": tmp_path, "version": 3})], max_epochs=epochs, record=False)
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["version_3"]
    frame = pandas.read_csv(tmp_path / "default" / "version_3" / "metrics.csv")
    assert frame["epoch"].max() == 0  # only the second fit's rows


IDENTICAL_RUN = """
import sys
import torch
import torch.nn.functional as F
import hooktrain
from hooktrain.testing import make_data, make_model

train, val = make_data()
trainer = hooktrain.Trainer(plugins=[("csv", {"log_dir": sys.argv[1]})], max_epochs=1, seed=0)
trainer.fit(make_model(), train, val, loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), metrics={"acc": hooktrain.accuracy})
"""


def test_identical_runs_write_identical_files(tmp_path: Path) -> None:
    # The epoch's names came from a set, so the columns' order followed the
    # interpreter's string hashing, which differs from one process to the next.
    files = []
    for seed in ("1", "2", "3"):
        log_dir = tmp_path / seed
        subprocess.run(
            [sys.executable, "-c", IDENTICAL_RUN, str(log_dir)],
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        files.append((log_dir / "default" / "version_0" / "metrics.csv").read_text())
    assert files[0] == files[1] == files[2]


class SaveAtFirstEpochEnd:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 0:
            torch.save(trainer.dump_checkpoint(), self.path)


def test_a_resume_from_an_earlier_checkpoint_replaces_the_rows_after_it(tmp_path: Path) -> None:
    # The rows past the checkpoint's step were kept and the resumed run's values of
    # those steps left out: after a resume from an earlier checkpoint (or on other
    # data) the file held the abandoned run's values, where TensorBoard showed the
    # resumed run's.
    options = ("csv", {"log_dir": tmp_path})
    path = tmp_path / "epoch0.ckpt"
    run([options, SaveAtFirstEpochEnd(path)], max_epochs=2, record=False)
    train, val = make_data()
    halved = [(inputs * 0.5, targets) for inputs, targets in train]
    resumed = run([options], max_epochs=2, data=(halved, val), fit_kwargs={"ckpt_path": path})
    published = {}
    for call in resumed.recorder.of("log_metrics"):
        suffix = "_epoch" if call.kwargs["scope"] == "epoch" else ""
        for name, value in call.kwargs["metrics"].items():
            published[(name + suffix, call.kwargs["step"])] = value
    written = cells(tmp_path / "default" / "version_0" / "metrics.csv")
    after = {pair: value for pair, value in written.items() if pair[1] > STEPS_PER_EPOCH}
    assert after == pytest.approx(published)
    assert sorted(step for key, step in written if key == "loss_epoch") == [8, 16]


class LogsName:
    def __init__(self, name: str) -> None:
        self.metric = name

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        trainer.log(self.metric, trainer.global_step / STEPS_PER_EPOCH)


@pytest.mark.parametrize("name", ["step", "epoch"])
def test_a_metric_named_like_an_index_column_is_refused(tmp_path: Path, name: str) -> None:
    # The row's own step or epoch was overwritten (epoch=0.21 the HF Trainer's way),
    # and the resume that read the steps back failed on "1000.5".
    from hooktrain import HookError

    with pytest.raises(HookError, match=f"a metric named '{name}' would replace"):
        run([("csv", {"log_dir": tmp_path}), LogsName(name)], log_every_n_steps=2, record=False)


class FailsAtFitStart:
    @hookimpl
    def on_fit_start(self) -> None:
        raise RuntimeError("failed before training")


def test_a_resume_that_fails_before_writing_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    # The rows past the checkpoint were removed as the resume started: a resume that
    # failed then (another process count, a bad option) cut the run's file for good.
    options = ("csv", {"log_dir": tmp_path})
    path = tmp_path / "epoch0.ckpt"
    run([options, SaveAtFirstEpochEnd(path)], max_epochs=2, record=False)
    metrics = tmp_path / "default" / "version_0" / "metrics.csv"
    before = metrics.read_text(encoding="utf-8")
    with pytest.raises(Exception, match="failed before training"):
        run([options, FailsAtFitStart()], max_epochs=2, fit_kwargs={"ckpt_path": path})
    assert metrics.read_text(encoding="utf-8") == before
