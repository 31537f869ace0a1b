"""hooktrain-accelerate in two real processes on the CPU (gloo), started the way
users start them: plain ``torchrun`` with no extra environment variable, and
``accelerate launch``.

Each run executes ``accelerate_worker.py``; every rank writes what it saw. The
reference is the core alone in this process, with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import Trainer, accuracy
from hooktrain.testing import make_data, make_model

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("accelerate_worker.py")
PER_RANK_BATCH = 8
N_TRAIN = 80  # 5 global batches of 16: no padding of training batches
N_VAL = N_TRAIN // 4  # 20: the last evaluation batches are padded on 2 processes


def launch(
    config: dict[str, Any], out: Path, launcher: str = "torchrun", *, stderr_per_rank: bool = False
) -> subprocess.CompletedProcess:
    """Run the worker on two processes. With ``stderr_per_rank`` (torchrun only), each
    process's stderr goes to its own file, read with :func:`stderr_of`."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"out": str(out), "batch_size": PER_RANK_BATCH, "n": N_TRAIN, **config}
    if torch.cuda.is_available() and "accelerate" not in config:
        # These tests are about the CPU (gloo) path; a GPU machine may have fewer
        # GPUs than processes.
        config["accelerate"] = {"cpu": True}
    if launcher == "torchrun":
        prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        if stderr_per_rank:
            prefix += ["--log-dir", str(out / "logs"), "--redirects", "2"]
    else:
        prefix = [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "0",
        ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU")
    }
    env["OMP_NUM_THREADS"] = "1"
    args = [sys.executable, *prefix, str(WORKER), json.dumps(config)]
    launcher_process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        # A guard against a hung collective, not a speed check.
        stdout, stderr = launcher_process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # The launcher stops its workers on SIGTERM (each runs in its own session,
        # out of reach of a signal to the launcher's group); killed outright, it
        # would leave them waiting in the collective.
        launcher_process.terminate()
        try:
            launcher_process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            launcher_process.kill()
            launcher_process.communicate()
        raise
    return subprocess.CompletedProcess(args, launcher_process.returncode, stdout, stderr)


def stderr_of(out: Path, rank: int) -> str:
    """What process ``rank`` wrote to stderr, in a run launched with ``stderr_per_rank``."""
    (path,) = (out / "logs").glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text()


def ranks(out: Path, proc: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    if proc.returncode != 0 and (out / "logs").is_dir():
        details = "\n".join(stderr_of(out, r)[-3000:] for r in (0, 1))
    else:
        details = proc.stderr[-4000:]
    assert proc.returncode == 0, details
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def single_process(model: nn.Module, **kwargs: Any) -> Trainer:
    """The core alone, one process, global batch = 2 x the per-rank batch."""
    trainer = Trainer(
        plugins=[],
        seed=0,
        device="cpu",
        log_every_n_steps=1,
        max_epochs=kwargs.pop("max_epochs", 2),
        **kwargs,
    )
    train, val = make_data(n=N_TRAIN, batch_size=2 * PER_RANK_BATCH)
    if callable(getattr(model, "configure_optimizers", None)):
        trainer.fit(model, train, val)
    else:
        trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            metrics={"acc": accuracy},
        )
    return trainer


def assert_weights_close(report: dict[str, Any], model: nn.Module) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(report["weights"][name]), value, rtol=0, atol=1e-6, msg=name
        )


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """Two processes, a plain model, with the tqdm, TensorBoard and checkpoint
    plugins each pointed at a per-rank location, so that any write by rank 1
    would show."""
    for name in ("hooktrain_tqdm", "hooktrain_tensorboard", "hooktrain_checkpoint"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("plain")
    config = {"tqdm": True, "tensorboard": True, "checkpoint": {"dirpath": "ckpt-rank{rank}"}}
    return out, ranks(out, launch(config, out))


def test_two_processes_train_like_one_with_the_global_batch(plain_run) -> None:
    _, reports = plain_run
    reference_model = make_model()
    reference = single_process(reference_model)
    for report in reports:
        assert report["world_size"] == 2
        assert report["global_step"] == reference.global_step == 10
        assert_weights_close(report, reference_model)
        # Metrics are the global ones: equal on both ranks and to one process's.
        assert report["metrics"] == pytest.approx(reference.metrics.floats(), abs=1e-6)
        # 20 validation samples per run, twice: the padding was dropped.
        assert report["gathered_eval_samples"] == 2 * N_VAL
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["weights"] == reports[1]["weights"]


def test_only_rank_zero_draws_bars_writes_events_and_checkpoints(plain_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, reports = plain_run
    assert "epoch 2/2" in (out / "bars-rank0.txt").read_text()
    assert (out / "bars-rank1.txt").read_text() == ""
    assert sorted(p.name for p in (out / "ckpt-rank0").iterdir()) == [
        "epoch=1-step=10.ckpt",
        "last.ckpt",
    ]
    assert not (out / "ckpt-rank1").exists() or not any((out / "ckpt-rank1").iterdir())
    events = list((out / "runs-rank0").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    assert not list((out / "runs-rank1").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    logged = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    assert logged["val/loss"] == pytest.approx(reports[0]["metrics"]["val_loss"], abs=1e-6)
    assert logged["epoch/loss"] == pytest.approx(reports[0]["metrics"]["loss"], abs=1e-6)


def test_exact_resume_mid_epoch_in_two_processes(plain_run, tmp_path) -> None:
    _, uninterrupted = plain_run
    checkpoint = {"dirpath": "ckpt"}
    # Stop after 3 of the first epoch's 5 steps; the checkpoint plugin saves last.
    ranks(tmp_path, launch({"max_steps": 3, "checkpoint": checkpoint}, tmp_path))
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    (tmp_path / "ckpt").rename(resumed_out / "ckpt")
    resumed = ranks(
        resumed_out, launch({"ckpt_path": "last", "checkpoint": checkpoint}, resumed_out)
    )
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["global_step"] == 10
        assert after["weights"] == before["weights"]  # bit for bit
        assert after["metrics"] == before["metrics"]


def test_processes_that_draw_differently_each_resume_from_their_own_random_state(
    tmp_path,
) -> None:
    # accelerate iterates an iterable dataset on rank 0 only: its shuffle draws from
    # rank 0's generator, so rank 1's stream differs. The checkpoint held rank 0's
    # state alone, restored on both, and the resumed rank 1 drew other dropout masks.
    config = {"train": "shuffled stream", "dropout": 0.2, "max_epochs": 2}
    uninterrupted = ranks(tmp_path / "whole", launch(config, tmp_path / "whole"))
    checkpoint = {"dirpath": "ckpt"}
    stopped = tmp_path / "stopped"
    # 3 steps an epoch (5 batches dispatched to 2 processes): stopped inside the second.
    ranks(stopped, launch({**config, "max_steps": 4, "checkpoint": checkpoint}, stopped))
    resumed = ranks(
        stopped, launch({**config, "ckpt_path": "last", "checkpoint": checkpoint}, stopped)
    )
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["global_step"] == before["global_step"] == 6
        assert after["weights"] == before["weights"]  # bit for bit


class StepModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_own_training_step_with_accumulation_and_clipping_synchronises_once_per_step(
    tmp_path,
) -> None:
    config = {
        "model": "step",
        "accumulate_grad_batches": 2,
        "gradient_clip_val": 0.5,
        "max_epochs": 1,
        "count_allreduce": True,
    }
    reports = ranks(tmp_path, launch(config, tmp_path))
    reference_model = StepModel()
    reference = single_process(
        reference_model, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5
    )
    for report in reports:
        # 5 micro-batches in windows of 2, 2, 1: three optimizer steps, and DDP
        # all-reduced gradients three times (never inside a window: no_sync works).
        assert report["global_step"] == reference.global_step == 3
        assert report["gradient_allreduces"] == 3
        assert_weights_close(report, reference_model)
        # A model's own validation step: no padded duplicates in val_loss.
        assert report["metrics"] == pytest.approx(reference.metrics.floats(), abs=1e-6)


def test_compiled_after_the_ddp_wrap_an_own_training_step_still_synchronises(tmp_path) -> None:
    # The compile plugin wraps what accelerate prepared: torch.compile(DDP(...)).
    # The routed training_step runs compiled and DDP still all-reduces once per step.
    config = {
        "model": "step",
        "accumulate_grad_batches": 2,
        "max_epochs": 1,
        "count_allreduce": True,
        "compile": {"backend": "eager"},
    }
    reports = ranks(tmp_path, launch(config, tmp_path))
    reference_model = StepModel()
    reference = single_process(reference_model, max_epochs=1, accumulate_grad_batches=2)
    for report in reports:
        assert report["compiled_graphs"] > 0
        assert report["global_step"] == reference.global_step == 3
        assert report["gradient_allreduces"] == 3
        assert_weights_close(report, reference_model)
    assert reports[0]["weights"] == reports[1]["weights"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only launch path")
def test_accelerate_launch_on_the_cpu_trains_distributed_in_bf16(tmp_path) -> None:
    config = {"max_epochs": 1, "accelerate": {"mixed_precision": "bf16"}}
    reports = ranks(tmp_path, launch(config, tmp_path, launcher="accelerate"))
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]
    assert reports[0]["metrics"] == reports[1]["metrics"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, cpu=False is distributed")
def test_a_launch_that_would_train_n_independent_copies_is_refused(tmp_path) -> None:
    # cpu=False forces what a plain Accelerator() does under torchrun on a
    # machine without a GPU: N processes that each think they are alone.
    proc = launch({"max_epochs": 1, "accelerate": {"cpu": False}}, tmp_path)
    assert proc.returncode != 0
    assert "launched as 2 processes but the Accelerator sees 1" in proc.stderr
    assert not (tmp_path / "rank0.json").exists()


# ---------------------------------------------------------------------- collectives
# Every collective must be entered by every process, whatever each saw: a process
# with no batch, or with other metric names, or that decided otherwise.


def reference_val_metrics(report: dict[str, Any], n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and accuracy of the run's final weights on the worker's ``n_val``
    indexed validation samples, computed here in one piece."""
    model = StepModel()
    model.load_state_dict({k: torch.tensor(v) for k, v in report["weights"].items()})
    inputs, targets = make_data(n=4 * n_val)[1].dataset.tensors
    with torch.no_grad():
        outputs = model(inputs)
    return F.cross_entropy(outputs, targets), accuracy(outputs, targets)


@pytest.mark.parametrize("model", ["step", "outputs"])
def test_a_process_without_a_validation_batch_still_reduces_with_the_others(
    tmp_path, model
) -> None:
    # 2 samples in one batch: with a model's own validation step the evaluation
    # loaders are split unevenly, so rank 0 gets the batch and rank 1 none.
    config = {"model": model, "max_epochs": 1, "val": {"n": 2, "batch_size": 2}, "validate": True}
    reports = ranks(tmp_path, launch(config, tmp_path))
    assert [r["validation_batches_in_fit"] for r in reports] == [1, 0]
    assert reports[0]["weights"] == reports[1]["weights"]
    loss, acc = reference_val_metrics(reports[0], n_val=2)
    for report in reports:
        # Both processes hold the one batch's loss, inside fit and from validate().
        assert report["metrics"]["val_loss"] == pytest.approx(loss.item(), abs=1e-6)
        assert report["validate"]["val_loss"] == pytest.approx(loss.item(), abs=1e-6)
        if model == "outputs":
            # Computed from outputs and targets: not gathered per batch (rank 1 has
            # no batch to gather), reduced at the end like the loss.
            assert report["metrics"]["val_acc"] == pytest.approx(acc.item(), abs=1e-6)


def test_validation_metrics_named_differently_on_each_process_are_reduced_by_name(
    tmp_path,
) -> None:
    # One validation sample a batch: rank 0 gets samples 0 and 2 and returns "a",
    # rank 1 gets 1 and 3 and returns "b"; each value is the sample's index.
    config = {"model": "parity", "max_epochs": 1, "val": {"n": 4, "batch_size": 1}}
    reports = ranks(tmp_path, launch({**config, "validate": True}, tmp_path))
    assert [r["validation_batches_in_fit"] for r in reports] == [2, 2]
    for report in reports:
        # The processes agreed on the names (all_gather_object) before summing, and
        # each name is averaged over the processes that logged it.
        val = {k: v for k, v in report["metrics"].items() if k.startswith("val_")}
        assert val == pytest.approx({"val_a": 1.0, "val_b": 2.0})  # (0 + 2) / 2, (1 + 3) / 2
        assert report["validate"] == pytest.approx({"val_a": 1.0, "val_b": 2.0})


def test_a_training_value_logged_on_one_process_only_is_its_mean_on_every_process(
    tmp_path,
) -> None:
    # Rank 1 alone logs only_rank1 = 5 after every training batch.
    reports = ranks(tmp_path, launch({"max_epochs": 1, "log_on_rank": 1}, tmp_path))
    reference = single_process(make_model(), max_epochs=1)
    for report in reports:
        assert report["metrics"]["only_rank1"] == pytest.approx(5.0)
        # The names every process logged are reduced as before.
        assert report["metrics"]["loss"] == pytest.approx(reference.metrics["loss"], abs=1e-6)


def test_early_stopping_decided_on_one_process_is_recorded_and_saved_on_all(tmp_path) -> None:
    # The score is logged after validation, so each process keeps its own: rising
    # on rank 0, flat on rank 1, which alone finds no improvement at epoch 1.
    stopping = {"monitor": "val_score", "mode": "max", "patience": 0}
    config = {
        "max_epochs": 4,
        "score": True,
        "early_stopping": stopping,
        "checkpoint": {"dirpath": "ckpt"},
    }
    reports = ranks(tmp_path, launch(config, tmp_path, stderr_per_rank=True))
    for report in reports:
        assert report["epochs_trained"] == 2
        assert report["early_stopping"]["stopped_epoch"] == 1
    assert "val_score did not improve" in reports[1]["early_stopping"]["stop_reason"]
    assert "hooktrain: early stopping at epoch 1: decided on rank 1" in stderr_of(tmp_path, 0)
    assert "early stopping" not in stderr_of(tmp_path, 1)  # only rank 0 prints
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["plugins"]["early_stopping"]["stopped_epoch"] == 1

    # Resuming the stopped run trains no further, on either process.
    resumed_out = tmp_path / "resumed"
    resumed_out.mkdir()
    (tmp_path / "ckpt").rename(resumed_out / "ckpt")
    resumed = ranks(resumed_out, launch({**config, "ckpt_path": "last"}, resumed_out))
    for before, after in zip(reports, resumed, strict=True):
        assert after["epochs_trained"] == 0
        assert after["global_step"] == before["global_step"]
        assert after["early_stopping"]["stopped_epoch"] == 1


# ---------------------------------------------------------------------- epoch metrics


def test_whole_epoch_metrics_in_two_processes_equal_one_process_and_resume_exactly(
    tmp_path,
) -> None:
    pytest.importorskip("torchmetrics")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

    # One launch, three fits per process: whole, stopped mid-epoch, resumed.
    reports = ranks(tmp_path, launch({"epoch_metrics": True}, tmp_path))
    reference_model = make_model()
    reference = Trainer(plugins=[], seed=0, device="cpu", max_epochs=2)
    train, val = make_data(n=N_TRAIN, batch_size=2 * PER_RANK_BATCH)
    reference.fit(
        reference_model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        metrics={
            "f1": MulticlassF1Score(num_classes=2, average="macro"),
            "auroc": MulticlassAUROC(num_classes=2),
            "acc": accuracy,
        },
    )
    inputs, targets = val.dataset.tensors
    with torch.no_grad():
        outputs = reference_model(inputs)
    expected = {
        "val_f1": sklearn_metrics.f1_score(targets, outputs.argmax(dim=1), average="macro"),
        "val_auroc": sklearn_metrics.roc_auc_score(targets, outputs.softmax(dim=1)[:, 1]),
    }
    for report in reports:
        assert report["world_size"] == 2
        assert_weights_close(report, reference_model)
        metrics = report["metrics"]
        # Training: each process's state merged with the other's at the epoch's end.
        # Validation: gathered outputs, the samples padding the last batch dropped
        # (20 samples per validation reached the metrics, not 24).
        for name in ("f1", "auroc", "val_f1", "val_auroc"):
            assert metrics[name] == pytest.approx(reference.metrics[name], abs=1e-5), name
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-5), name
        assert report["gathered_eval_samples"] == 2 * N_VAL
        # Stopped 2 steps into the second epoch; every process restored its own
        # running means and metric states, so the resumed epoch's values are the
        # whole epoch's (with rank 0's loaded on both, the loss mean was not).
        assert report["stopped_step"] == 7
        for name in ("loss", "acc", "f1", "auroc", "val_f1", "val_auroc"):
            assert report["resumed_metrics"][name] == metrics[name], name
    # Every process reads the same values.
    assert reports[0]["metrics"] == reports[1]["metrics"]


def test_a_window_ended_by_data_of_unknown_length_is_synchronised_and_stepped(tmp_path) -> None:
    # Each process gets five of the ten batches an epoch: windows of 3 and 2. Without
    # a length, the core learns that the second window is complete only when the
    # data ends, after its backward ran under no_sync: accelerate then skipped the
    # step and the zero_grad, and the gradients leaked into the next epoch.
    reports = ranks(tmp_path, launch({"unsized": True}, tmp_path))
    for report in reports:
        assert report["unsized"]["global_step"] == report["sized"]["global_step"] == 4
        # Equal to float rounding: the late window averages after DDP's all-reduce,
        # DDP itself before it.
        for name, value in report["sized"]["weights"].items():
            torch.testing.assert_close(
                torch.tensor(report["unsized"]["weights"][name]),
                torch.tensor(value),
                rtol=0,
                atol=1e-6,
                msg=name,
            )
        assert not any(report["unsized"]["grads_left"])
    assert reports[0]["unsized"]["weights"] == reports[1]["unsized"]["weights"]


def test_an_exception_on_one_process_ends_the_job(tmp_path) -> None:
    # Rank 1 raised, and, exiting, waited at the exit barrier for rank 0, which was
    # blocked in the next step's collective: the job hung until killed. (launch's
    # timeout is the guard against a hang.)
    fault = {"hook": "on_train_batch_end", "step": 2, "fault": "exception", "rank": 1}
    proc = launch({"faults": fault}, tmp_path)
    assert proc.returncode != 0
    assert "injected fault at hook on_train_batch_end, global step 2, rank 1" in proc.stderr


def test_data_accelerate_cannot_split_counts_each_sample_once_or_is_refused(tmp_path) -> None:
    reports = ranks(tmp_path, launch({"unsplittable": True}, tmp_path))
    # predict gathers nothing: padding the last batches (as gathering evaluation
    # outputs needs) repeated samples 0, 1 and 2 in rank 1's share.
    shares = [report["predictions"] for report in reports]
    assert sorted(shares[0] + shares[1]) == list(range(37))
    # A list of batches is evaluated whole on each process; merged, the counts
    # were doubled (40 samples).
    assert [report["validated_count"] for report in reports] == [N_VAL, N_VAL]
    # Trained whole on each process, it repeated a one-process run at twice the cost.
    for report in reports:
        assert report["fit_error"].startswith("HookError: plugin 'accelerate' raised in hook")
        assert (
            "ConfigurationError: accelerate: the training data must be a torch DataLoader "
            "to be split across the 2 processes; got list" in report["fit_error"]
        )
        # Split by hand and again by accelerate, each process validated a quarter of
        # the set and reported its own val_loss, without an error.
        assert (
            "the evaluation dataloader 0 holds a different dataset on each process"
            in (report["split_error"])
        )


@pytest.mark.parametrize("every_step", [False, True])
def test_a_nan_loss_on_one_process_stops_every_process_with_the_same_error(
    tmp_path, every_step: bool
) -> None:
    # Rank 1 alone raised (at the log point, or before backward with
    # check_finite_every_step); rank 0 went on into the next collective and failed
    # there with an unrelated error (on NCCL it would wait until timeout).
    fault = {"hook": "forward_step", "step": 3, "fault": "nan_loss", "rank": 1}
    config = {"faults": fault, "check_finite_every_step": every_step}
    proc = launch(config, tmp_path, stderr_per_rank=True)
    assert proc.returncode != 0
    if every_step:
        expected = (
            "NonFiniteLossError: the training loss is not finite on at least one of the 2 processes"
        )
    else:  # the log point of the step that makes it 4
        expected = (
            "NonFiniteLossError: the training loss became NaN or infinite between global "
            "steps 4 and 4 on at least one of the 2 processes"
        )
    for rank in (0, 1):
        assert expected in stderr_of(tmp_path, rank), rank
