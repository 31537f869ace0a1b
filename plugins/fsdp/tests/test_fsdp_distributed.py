"""The fsdp plugin across real processes: ``torchrun`` with the gloo backend on the
CPU, and two simulated nodes on this machine.

Each launch costs tens of seconds here, so a few launches check many things:

* ``reference``: 2 processes train 3 epochs with step-wise sharded checkpoints
  (equivalence to 1 process, memory per process, both checkpoint kinds);
* ``interrupted``: the same run stopped by SIGTERM, resumed and SIGKILLed in the
  middle of a collective save, resumed again: it must end bit-identical to
  ``reference``;
* two nodes with accelerate, two with fsdp.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hooktrain import Trainer
from hooktrain.testing import make_data, make_model

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp_worker.py")
N_TRAIN = 80
PER_RANK_BATCH = 8  # 5 optimizer steps per epoch on 2 processes
CHECKPOINT = {"dirpath": "ckpt", "every_n_train_steps": 2, "save_top_k": 2}
CONFIG = {"max_epochs": 3, "n": N_TRAIN, "batch_size": PER_RANK_BATCH, "checkpoint": CHECKPOINT}


def _environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def _communicate(process: subprocess.Popen) -> tuple[str, str]:
    try:
        # A guard against a hung collective, not a speed check.
        return process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # torchrun stops its workers on SIGTERM; killed outright it would leave them.
        process.terminate()
        try:
            return process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.communicate()


def launch(config: dict[str, Any], out: Path) -> subprocess.CompletedProcess:
    """The worker under ``torchrun --standalone --nproc_per_node 2``."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        json.dumps({"out": str(out), **config}),
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment()
    )
    stdout, stderr = _communicate(process)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def reports(out: Path, proc: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def one_process_reference(max_epochs: int = 3) -> torch.nn.Module:
    """The core alone in this process, with the global batch (2 x per process)."""
    model = make_model()
    trainer = Trainer(plugins=[], seed=0, device="cpu", max_epochs=max_epochs)
    train, val = make_data(n=N_TRAIN, batch_size=2 * PER_RANK_BATCH)
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    pytest.importorskip("hooktrain_checkpoint")
    out = tmp_path_factory.mktemp("reference")
    return out, reports(out, launch(CONFIG, out))


def test_two_processes_match_one_and_each_holds_half_the_parameters(reference) -> None:
    _, ranks = reference
    model = one_process_reference()
    for report in ranks:
        assert report["world_size"] == 2 and report["global_step"] == 15
        for name, value in model.state_dict().items():
            torch.testing.assert_close(
                torch.tensor(report["weights"][name]), value, rtol=0, atol=1e-5, msg=name
            )
        assert report["local_numel"] <= 0.6 * report["numel"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]


def test_each_sample_counts_once_in_a_summing_metric(reference) -> None:
    # The training set is split over the processes and the validation set runs whole
    # on each; a count of samples came out twice the validation set's size.
    _, ranks = reference
    for report in ranks:
        assert report["metrics"]["samples"] == N_TRAIN
        assert report["metrics"]["val_samples"] == N_TRAIN // 4


def test_every_process_wrote_its_shards_into_one_committed_directory(reference) -> None:
    out, _ = reference
    directory = out / "ckpt"
    assert sorted(p.name for p in directory.iterdir()) == [
        "epoch=2-step=12.ckpt",
        "epoch=2-step=14.ckpt",
        "last.ckpt",
    ]
    for checkpoint in directory.iterdir():
        assert sorted(p.name for p in checkpoint.iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "state.ckpt",
        ]


def test_a_two_process_checkpoint_resumes_in_one_plain_process(reference, tmp_path) -> None:
    from hooktrain_checkpoint import read_info

    out, ranks = reference
    # The step-12 checkpoint, resumed by the core alone (no fsdp) with the global
    # batch, trains the last 3 steps as the 2 processes did.
    for item in (out / "ckpt").iterdir():
        if item.name == "epoch=2-step=12.ckpt":
            (tmp_path / "ckpt").mkdir()
            os.symlink(item, tmp_path / "ckpt" / item.name)
    assert read_info(out / "ckpt" / "last.ckpt").record["world_size"] == 2
    model = make_model()
    trainer = Trainer(
        plugins=[("checkpoint", {"dirpath": tmp_path / "ckpt", "save_last": False})],
        seed=0,
        device="cpu",
        max_epochs=3,
    )
    train, val = make_data(n=N_TRAIN, batch_size=2 * PER_RANK_BATCH)
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
        ckpt_path="last",
    )
    assert trainer.global_step == 15
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(ranks[0]["weights"][name]), value, rtol=0, atol=1e-5, msg=name
        )


def test_sigterm_then_sigkill_mid_save_then_resume_is_bit_identical(reference, tmp_path) -> None:
    _, uninterrupted = reference
    # 1. SIGTERM to rank 1 after step 3: both stop after that step, save it, exit cleanly.
    term = {"rank": 1, "step": 3, "signal": "SIGTERM", "moment": "batch-end"}
    stopped = reports(tmp_path, launch({**CONFIG, "fault": term}, tmp_path))
    assert [r["global_step"] for r in stopped] == [3, 3]
    from hooktrain_checkpoint import read_info

    saved_step = read_info(tmp_path / "ckpt" / "last.ckpt").record["global_step"]
    assert saved_step == stopped[0]["global_step"]

    # 2. Resumed, then SIGKILL to rank 1 while it writes its shard of step 14.
    kill = {"rank": 1, "step": 14, "signal": "SIGKILL", "moment": "shard-write"}
    killed = launch({**CONFIG, "fault": kill, "ckpt_path": "last"}, tmp_path)
    assert killed.returncode != 0
    # The killed save never became a checkpoint: last is still step 12, 2 batches
    # into the last epoch.
    record = read_info(tmp_path / "ckpt" / "last.ckpt").record
    assert (record["global_step"], record["epoch_batches_done"]) == (12, 2)
    assert not (tmp_path / "ckpt" / "epoch=2-step=14.ckpt").exists()
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "ckpt").iterdir())

    # 3. Resumed again, it ends where the uninterrupted run did, bit for bit; the
    # last epoch's means count the batches of both processes from before the kill.
    resumed = reports(tmp_path, launch({**CONFIG, "ckpt_path": "last"}, tmp_path))
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["global_step"] == 15
        assert after["weights"] == before["weights"]
        assert after["metrics"] == pytest.approx(before["metrics"], abs=1e-6)
    # The leftover of the killed save was cleaned up.
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


# ---------------------------------------------------------------------- two nodes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_nodes(config: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Two torchrun launches of one process each, as node 0 and node 1 of a job
    whose master is this machine."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    processes = []
    for node in (0, 1):
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(WORKER),
            json.dumps({"out": str(out), **config}),
        ]
        processes.append(
            subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment()
            )
        )
    results = [(p, *_communicate(p)) for p in processes]
    for process, _, stderr in results:
        assert process.returncode == 0, stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize(
    "plugin, options",
    [("fsdp", {"timeout": 60}), ("accelerate", {"cpu": True})],
    ids=["fsdp", "accelerate"],
)
def test_two_nodes_train_as_one_job(tmp_path, plugin, options) -> None:
    if plugin == "accelerate":
        pytest.importorskip("hooktrain_accelerate")
    # Ranked by each step's loss, which differs between the processes: with fsdp
    # rank 0 entered the collective save alone when rank 1 had ranked the step
    # lower, and the job hung (until fsdp's timeout).
    ranked = {"dirpath": "ckpt", "every_n_train_steps": 1, "monitor": "loss"}
    ranked.update(save_top_k=1, save_last=False)
    config = {"plugin": plugin, "options": options, "max_epochs": 2, "batch_size": PER_RANK_BATCH}
    # fsdp evaluates each loader as given, whole or split per process;
    # accelerate splits every loader itself.
    config["split_validation"] = plugin == "fsdp"
    ranks = launch_two_nodes({**config, "checkpoint": ranked}, tmp_path)
    (kept,) = (tmp_path / "ckpt").iterdir()
    if plugin == "fsdp":
        assert sorted(p.name for p in kept.iterdir() if p.name.endswith(".distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # Each validation sample counts once, on every process, whoever split the set:
    # accelerate (padded), or for fsdp nobody (each process evaluates it whole), a
    # DistributedSampler, or a Subset per rank. A sum came out twice the set's size
    # on the whole set, and the Subsets' losses differed between the ranks.
    for report in ranks:
        metrics = report["metrics"]
        if plugin == "accelerate":
            assert metrics["val_samples"] == N_TRAIN // 4
            continue
        whole = metrics["val_loss/dataloader_idx_0"], metrics["val_acc/dataloader_idx_0"]
        for i in range(3):
            assert metrics[f"val_samples/dataloader_idx_{i}"] == N_TRAIN // 4
            split = metrics[f"val_loss/dataloader_idx_{i}"], metrics[f"val_acc/dataloader_idx_{i}"]
            assert split == pytest.approx(whole, rel=1e-6)
        assert whole == pytest.approx(
            (
                ranks[0]["metrics"]["val_loss/dataloader_idx_0"],
                ranks[0]["metrics"]["val_acc/dataloader_idx_0"],
            ),
            rel=1e-6,
        )
        # Split by a DistributedSampler, though each process's first batch is the
        # same: each process counted only its own share, and the ranks disagreed.
        assert metrics["val_samples/dataloader_idx_3"] == N_TRAIN // 4
        for name in ("val_loss/dataloader_idx_3", "val_acc/dataloader_idx_3"):
            assert metrics[name] == pytest.approx(ranks[0]["metrics"][name], rel=1e-6)
    model = one_process_reference(max_epochs=2)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(ranks[0]["weights"][name]), value, rtol=0, atol=1e-5, msg=name
        )


def test_an_exception_on_one_process_ends_the_job(tmp_path) -> None:
    # Rank 1 raised, and, exiting, waited at the exit barrier for rank 0, which was
    # blocked in the next step's collective: the job hung until killed. (launch's
    # timeout is the guard against a hang.)
    fault = {"hook": "on_train_batch_end", "step": 2, "fault": "exception", "rank": 1}
    proc = launch({"faults": fault}, tmp_path)
    assert proc.returncode != 0
    assert "injected fault at hook on_train_batch_end, global step 2, rank 1" in proc.stderr


def test_processes_that_see_different_checkpoints_are_refused_before_loading(tmp_path) -> None:
    # A dirpath per rank: rank 0 found last.ckpt and waited in the sharded load's
    # collective while rank 1 started fresh, for the whole timeout (30 minutes),
    # printing nothing.
    pytest.importorskip("hooktrain_checkpoint")
    config = {"max_epochs": 1, "n": N_TRAIN, "batch_size": PER_RANK_BATCH}
    checkpoint = {"dirpath": "ckpt", "every_n_epochs": 1}
    saved = launch({**config, "checkpoint": checkpoint, "dirpath_per_rank": True}, tmp_path)
    assert saved.returncode == 0, saved.stderr[-4000:]
    assert (tmp_path / "ckpt_rank0" / "last.ckpt").is_dir()
    resumed = launch(
        {**config, "checkpoint": checkpoint, "dirpath_per_rank": True, "ckpt_path": "last"},
        tmp_path,
    )
    assert resumed.returncode != 0
    said = "the processes see different checkpoints for ckpt_path='last' (rank 0: "
    assert resumed.stderr.count(said) >= 2, resumed.stderr[-4000:]  # on both ranks
    assert "ckpt_rank1 holds nothing" in resumed.stderr


def test_a_validation_loader_empty_on_one_process_is_refused_by_name(tmp_path) -> None:
    # Every forward of a sharded model is a collective: rank 0 validated alone and
    # the job died in gloo ("Connection reset by peer"), naming nothing.
    config = {"max_epochs": 1, "n": N_TRAIN, "batch_size": PER_RANK_BATCH}
    proc = launch({**config, "empty_val_on_rank": 1}, tmp_path)
    assert proc.returncode != 0
    assert "the validate dataloader 0 yields no batches on process 1" in proc.stderr


def test_validation_loaders_of_unequal_lengths_are_refused_by_name(tmp_path) -> None:
    # A Subset per rank, one batch short on rank 1: rank 0's last forward waited for
    # rank 1, gone on to the metrics' all_reduce, and gloo aborted on a "collective
    # mismatch" (SIGABRT), naming nothing.
    config = {"max_epochs": 1, "n": N_TRAIN, "batch_size": PER_RANK_BATCH}
    proc = launch({**config, "uneven_val": True}, tmp_path)
    assert proc.returncode != 0
    assert re.search(
        r"the validate dataloader 0 yields \d+ on process 0, \d+ on process 1;", proc.stderr
    )


def test_a_share_without_a_length_is_not_counted_as_its_limit(tmp_path) -> None:
    # Rank 1's stream has no length: its count, taken as limit_val_batches (more than
    # the shares hold), was refused as unequal to rank 0's, though both run as many.
    config = {"max_epochs": 1, "n": N_TRAIN, "batch_size": PER_RANK_BATCH}
    proc = launch({**config, "sized_and_stream_val": True, "limit_val_batches": 50}, tmp_path)
    assert proc.returncode == 0, proc.stderr
