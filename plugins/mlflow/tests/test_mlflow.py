"""Runs logged to a real MLflow server (see conftest.py), read back with MlflowClient."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_mlflow import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Run

from hooktrain import HookError, Trainer, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import HookRecorder, make_data, make_model, run

SCRIPT = Path(__file__).with_name("killed_run.py")


def the_run(client: MlflowClient, experiment: str) -> Run:
    """The only run of ``experiment``."""
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(found) == 1
    return found[0]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def every_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: history(client, run_id, key) for key in keys}


def options(uri: str, experiment: str, **more: Any) -> tuple[str, dict[str, Any]]:
    return ("mlflow", {"tracking_uri": uri, "experiment_name": experiment, **more})


def test_selected_by_entry_point_name() -> None:
    assert installed_plugins()["mlflow"].value == "hooktrain_mlflow:MLFlowLogger"


def test_params_metrics_and_status(mlflow_server: str) -> None:
    experiment = f"fit-{uuid.uuid4().hex}"
    model = make_model()
    model.hparams = {"hidden": 16, "arch": [8, 16]}
    result = run(
        [options(mlflow_server, experiment, run_name="first", tags={"team": "a"})],
        model=model,
        max_epochs=2,
        log_every_n_steps=4,
    )
    client = MlflowClient(mlflow_server)
    logged = the_run(client, experiment)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "first"
    assert logged.data.tags["team"] == "a"
    params = logged.data.params
    assert params["max_epochs"] == "2"
    assert params["log_every_n_steps"] == "4"
    assert params["plugins"] == "mlflow, recorder"
    assert params["hidden"] == "16"
    assert params["arch"] == "8, 16"

    # Every published value under its key, at its step, once.
    expected: dict[str, list[tuple[int, float]]] = {}
    for call in result.recorder.of("log_metrics"):
        suffix = "_epoch" if call.kwargs["scope"] == "epoch" else ""
        for name, value in call.kwargs["metrics"].items():
            expected.setdefault(name + suffix, []).append((call.kwargs["step"], value))
    histories = every_history(client, logged.info.run_id)
    assert histories == expected
    assert [step for step, _ in histories["loss"]] == [4, 8, 12, 16]
    assert [step for step, _ in histories["loss_epoch"]] == [8, 16]
    assert [step for step, _ in histories["val_loss"]] == [8, 16]
    assert histories["loss_epoch"][-1][1] == pytest.approx(result.trainer.metrics["loss"])


class RaiseInSecondEpoch:
    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("stopped on purpose")


def test_a_fit_that_raises_ends_failed_with_what_it_published(mlflow_server: str) -> None:
    experiment = f"failed-{uuid.uuid4().hex}"
    with pytest.raises(HookError, match="stopped on purpose"):
        run([options(mlflow_server, experiment), RaiseInSecondEpoch()], max_epochs=3)
    client = MlflowClient(mlflow_server)
    logged = the_run(client, experiment)
    assert logged.info.status == "FAILED"
    assert [step for step, _ in history(client, logged.info.run_id, "loss_epoch")] == [8]


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_an_unreachable_server_fails_before_training(unused_uri: str, stage: str) -> None:
    uri = unused_uri
    # Before any on_fit_start or evaluation batch: a logger listed first
    # (TensorBoard, CSV) creates its run folder there, and a refused stage left
    # that folder empty, after a whole evaluation pass for validate.
    recorder = HookRecorder(["on_fit_start", "on_train_epoch_start", "on_validation_start"])
    with pytest.raises(HookError, match="no working tracking server at") as raised:
        run([options(uri, "nowhere"), recorder], stage=stage, record=False)
    assert uri in str(raised.value)
    assert recorder.calls == []


def test_a_tracking_uri_mlflow_cannot_use_fails_before_training_naming_it() -> None:
    recorder = HookRecorder(["on_train_epoch_start"])
    with pytest.raises(HookError, match=r"tracking_uri 'htp://127.0.0.1:1' is not one") as raised:
        run([options("htp://127.0.0.1:1", "nowhere"), recorder], record=False)
    assert isinstance(raised.value.__cause__, ValueError)  # a ConfigurationError
    assert recorder.calls == []


def test_only_the_global_zero_process_logs(mlflow_server: str) -> None:
    class RankOne:
        @hookimpl(tryfirst=True)
        def setup(self, trainer: Trainer) -> None:
            trainer.global_rank = 1

    experiment = f"rank-{uuid.uuid4().hex}"
    logger = MLFlowLogger(mlflow_server, experiment_name=experiment)
    run([RankOne(), logger], record=False)
    assert logger.run_id is None
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="start_timeout"):
        MLFlowLogger(start_timeout=0)
    with pytest.raises(ValueError, match="max_queue"):
        MLFlowLogger(max_queue=0)
    with pytest.raises(ValueError, match="tags must be a dict of tag names to values, got list"):
        MLFlowLogger(tags=["team-a"])


def _script(uri: str, experiment: str, ckpt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(SCRIPT),
        "--uri",
        uri,
        "--experiment",
        experiment,
        "--ckpt-dir",
        str(ckpt),
        *extra,
    ]
    # The timeout only keeps a hung run from hanging the suite.
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_a_killed_then_resumed_run_continues_with_every_step_once(
    mlflow_server: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    tag = uuid.uuid4().hex
    # The undisturbed run, in this process (the same computation as in a child).
    spec = importlib.util.spec_from_file_location("mlflow_killed_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train(mlflow_server, f"reference-{tag}", str(tmp_path / "reference"))

    experiment = f"killed-{tag}"
    killed = _script(mlflow_server, experiment, tmp_path / "ckpt", "--kill-at", "12")
    assert killed.returncode == -9, killed.stderr
    interrupted = the_run(client, experiment)
    assert interrupted.info.status == "RUNNING"
    # The run holds steps 10 and 11, past the checkpoint it resumes from (step 9).
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["progress"]["global_step"] == 9
    assert checkpoint["plugins"]["mlflow"]["run_id"] == interrupted.info.run_id
    assert history(client, interrupted.info.run_id, "loss")[-1][0] == 11

    resumed = _script(mlflow_server, experiment, tmp_path / "ckpt")
    assert resumed.returncode == 0, resumed.stderr
    logged = the_run(client, experiment)  # the same run, still the only one
    assert logged.info.run_id == interrupted.info.run_id
    assert logged.info.status == "FINISHED"
    histories = every_history(client, logged.info.run_id)
    for key, points in histories.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
    assert [step for step, _ in histories["loss"]] == list(range(1, 25))
    assert [step for step, _ in histories["loss_epoch"]] == [8, 16, 24]
    # Exact resume: the undisturbed run logged the same values at the same steps.
    expected = every_history(client, the_run(client, f"reference-{tag}").info.run_id)
    assert histories == expected

    artifacts = {item.path for item in client.list_artifacts(logged.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.ckpt", "checkpoints/epoch=2-step=24.ckpt"}
    local = Path(client.download_artifacts(logged.info.run_id, "checkpoints/last.ckpt", tmp_path))
    assert torch.load(local, weights_only=True)["progress"]["global_step"] == 24


def test_a_resume_publishing_more_often_fills_the_steps_between_those_held(
    mlflow_server: str, tmp_path: Path
) -> None:
    # Killed at step 15 after publishing every 2nd step (14 held, past the checkpoint
    # of step 12), resumed publishing every step: 13 was dropped below the last
    # step held, where the csv and tensorboard plugins kept it.
    client = MlflowClient(mlflow_server)
    experiment = f"interval-{uuid.uuid4().hex}"
    ckpt = tmp_path / "ckpt"
    killed = _script(mlflow_server, experiment, ckpt, "--kill-at", "15", "--log-every", "2")
    assert killed.returncode == -9, killed.stderr
    assert history(client, the_run(client, experiment).info.run_id, "loss")[-1][0] == 14
    resumed = _script(mlflow_server, experiment, ckpt, "--log-every", "1")
    assert resumed.returncode == 0, resumed.stderr
    steps = [step for step, _ in history(client, the_run(client, experiment).info.run_id, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12, *range(13, 25)]


def test_a_fit_stopped_by_sigterm_ends_killed_and_uploads_no_checkpoint(
    mlflow_server: str, tmp_path: Path
) -> None:
    # It ended FINISHED, and its best file so far stayed among the run's artifacts
    # after the resume had ranked it out (an artifact cannot be removed).
    experiment = f"sigterm-{uuid.uuid4().hex}"
    client = MlflowClient(mlflow_server)

    def fit(*extra: Any) -> Trainer:
        plugins = [
            ("checkpoint", {"dirpath": str(tmp_path), "monitor": "val_loss"}),
            options(mlflow_server, experiment, log_checkpoints=True),
            *extra,
        ]
        trainer = Trainer(plugins=plugins, max_epochs=3, seed=0, device="cpu")
        train, val = make_data(n=64, batch_size=16)
        trainer.fit(
            make_model(),
            train,
            val,
            loss_fn=F.cross_entropy,
            ckpt_path="last",
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        return trainer

    stopped = fit(("faults", {"hook": "on_train_batch_end", "step": 6, "fault": "sigterm"}))
    assert stopped.interrupted and stopped.global_step == 6
    interrupted = the_run(client, experiment)
    assert interrupted.info.status == "KILLED"
    assert client.list_artifacts(interrupted.info.run_id, "checkpoints") == []

    resumed = fit()
    assert not resumed.interrupted
    logged = the_run(client, experiment)
    assert logged.info.run_id == interrupted.info.run_id
    assert logged.info.status == "FINISHED"
    checkpoint = resumed.plugin_manager.get_plugin("checkpoint")
    uploaded = {item.path for item in client.list_artifacts(logged.info.run_id, "checkpoints")}
    assert uploaded == {
        f"checkpoints/{Path(path).name}"
        for path in (checkpoint.last_model_path, checkpoint.best_model_path)
    }


def test_a_test_after_fit_logs_into_the_fits_run(mlflow_server: str) -> None:
    experiment = f"test-{uuid.uuid4().hex}"
    result = run([options(mlflow_server, experiment)], max_epochs=1, record=False)
    scores = result.trainer.test(result.model, make_data()[1], loss_fn=F.cross_entropy)
    client = MlflowClient(mlflow_server)
    logged = the_run(client, experiment)
    assert logged.info.status == "FINISHED"
    assert history(client, logged.info.run_id, "test_loss") == [(8, scores["test_loss"])]


class SaveAtFirstEpochEnd:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 0:
            torch.save(trainer.dump_checkpoint(), self.path)


def test_a_checkpoint_whose_run_is_gone_resumes_into_a_new_run(
    mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = f"gone-{uuid.uuid4().hex}"
    path = tmp_path / "epoch0.ckpt"
    run([options(mlflow_server, experiment), SaveAtFirstEpochEnd(path)], record=False)
    client = MlflowClient(mlflow_server)
    first = the_run(client, experiment)
    client.delete_run(first.info.run_id)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["plugins"]["mlflow"]["run_id"] == first.info.run_id

    run([options(mlflow_server, experiment)], record=False, fit_kwargs={"ckpt_path": path})
    assert f"run {first.info.run_id} from the checkpoint is not in" in capsys.readouterr().err
    second = the_run(client, experiment)  # search_runs leaves deleted runs out
    assert second.info.run_id != first.info.run_id
    assert second.info.status == "FINISHED"
    # The new run holds the resumed fit's steps: the second epoch's.
    assert [step for step, _ in history(client, second.info.run_id, "loss_epoch")] == [16]


def test_sharded_checkpoints_are_uploaded_whole(mlflow_server: str, tmp_path: Path) -> None:
    # Under fsdp a checkpoint is a directory of shards, not a file.
    pytest.importorskip("hooktrain_fsdp")
    experiment = f"sharded-{uuid.uuid4().hex}"
    ckpt = tmp_path / "ckpt"
    logger = options(mlflow_server, experiment, log_checkpoints=True)
    run(["fsdp", ("checkpoint", {"dirpath": ckpt}), logger], max_epochs=1, record=False)
    kept = sorted(path for path in ckpt.iterdir() if not path.name.startswith("."))
    assert kept and all(path.is_dir() for path in kept)

    client = MlflowClient(mlflow_server)
    run_id = the_run(client, experiment).info.run_id
    uploaded = {artifact.path for artifact in client.list_artifacts(run_id, "checkpoints")}
    assert uploaded == {f"checkpoints/{path.name}" for path in kept}
    for path in kept:
        where = f"checkpoints/{path.name}"
        files = {artifact.path for artifact in client.list_artifacts(run_id, where)}
        assert files == {f"{where}/{part.name}" for part in path.iterdir()}


def test_a_resume_that_changes_the_checkpoints_kind_uploads_beside_the_old_one(
    mlflow_server: str, tmp_path: Path
) -> None:
    # Sharded under fsdp, then resumed without it: the run holds checkpoints/last.ckpt
    # as a folder, which an artifact of one file cannot replace.
    pytest.importorskip("hooktrain_fsdp")
    experiment = f"kinds-{uuid.uuid4().hex}"
    ckpt = ("checkpoint", {"dirpath": tmp_path / "ckpt"})
    logger = options(mlflow_server, experiment, log_checkpoints=True)
    run(["fsdp", ckpt, logger], max_epochs=1, record=False)
    with pytest.warns(UserWarning, match=r"checkpoints/last\.ckpt as a folder .* uploaded as "):
        run([ckpt, logger], max_epochs=2, record=False, fit_kwargs={"ckpt_path": "last"})

    client = MlflowClient(mlflow_server)
    logged = the_run(client, experiment)
    assert logged.info.status == "FINISHED"
    uploaded = {a.path: a.is_dir for a in client.list_artifacts(logged.info.run_id, "checkpoints")}
    assert uploaded["checkpoints/last.ckpt"] is True  # the sharded one, left as it was
    single = client.list_artifacts(logged.info.run_id, "checkpoints/single_file")
    assert [(a.path, a.is_dir) for a in single] == [("checkpoints/single_file/last.ckpt", False)]


class RaiseInTeardown:
    @hookimpl
    def teardown(self) -> None:
        raise RuntimeError("teardown failed on purpose")


def test_a_fit_whose_teardown_raises_ends_failed(mlflow_server: str) -> None:
    experiment = f"teardown-{uuid.uuid4().hex}"
    with pytest.raises(HookError, match="teardown failed on purpose"):
        run([options(mlflow_server, experiment), RaiseInTeardown()], max_epochs=1)
    assert the_run(MlflowClient(mlflow_server), experiment).info.status == "FAILED"


class LogsAt:
    """Logs ``name`` (1.0) after each optimizer step in ``steps``."""

    def __init__(self, name: str, steps: set[int]) -> None:
        self.metric, self.steps = name, steps

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_step in self.steps:
            trainer.log(self.metric, 1.0)


def test_a_name_the_server_refuses_is_reported_at_the_first_log_point(mlflow_server: str) -> None:
    # The first write waited for flush_secs or a checkpoint, so the refusal came
    # minutes into training (inside a checkpoint's save).
    experiment = f"badname-{uuid.uuid4().hex}"
    with pytest.raises(HookError, match="acc@5") as raised:
        run(
            [options(mlflow_server, experiment), LogsAt("acc@5", {1})],
            max_epochs=3,
            log_every_n_steps=2,
        )
    assert raised.value.hook == "log_metrics"
    assert "global step 2:" in str(raised.value)


def test_a_write_that_fails_in_a_checkpoint_does_not_cancel_the_save(
    mlflow_server: str, tmp_path: Path
) -> None:
    # on_save_checkpoint writes what waits; the server refusing it made the save
    # itself fail, so the run died without the checkpoint it was taking.
    pytest.importorskip("hooktrain_checkpoint")
    experiment = f"savefails-{uuid.uuid4().hex}"
    checkpoint = ("checkpoint", {"dirpath": str(tmp_path), "every_n_train_steps": 4})
    warned = pytest.warns(UserWarning, match=r"hooktrain-mlflow: could not send .* at step 4")
    with warned, pytest.raises(HookError, match="bad@name"):
        run(
            [options(mlflow_server, experiment), checkpoint, LogsAt("bad@name", {3})],
            max_epochs=1,
            log_every_n_steps=1,
            record=False,
        )
    # Training went on past the failed write, saving (the newest step save kept) until
    # the values were tried again at the end, and refused again.
    assert {p.name for p in tmp_path.glob("*.ckpt")} == {"epoch=0-step=8.ckpt", "last.ckpt"}
