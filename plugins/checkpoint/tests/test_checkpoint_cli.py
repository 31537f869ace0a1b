"""``hooktrain checkpoint PATH``: inspecting without training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint
from hooktrain_checkpoint.cli import main
from hooktrain_checkpoint.storage import load_file, write_file

from hooktrain import Trainer
from hooktrain.testing import make_data, make_model


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    trainer = Trainer(plugins=[checkpoint], max_epochs=2, device="cpu", seed=0)
    train, val = make_data()
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    return tmp_path


def test_a_file_shows_progress_metrics_plugins_and_integrity(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(directory / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "integrity:   ok (SHA-256 verified)" in out
    assert "epoch:       1 (epoch complete)" in out
    assert "global step: 16" in out
    assert "plugins:     checkpoint 0.1.0" in out
    assert "val_loss" in out and "hooktrain:   0.1.0" in out


def test_a_file_that_is_no_checkpoint_is_not_called_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(make_model().state_dict(), path)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "integrity:   not a hooktrain checkpoint (read intact)" in out
    assert "DAMAGED" not in out
    assert "model.load_state_dict(torch.load(path))" in out


def test_a_sharded_folder_without_its_state_file_is_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "epoch=1-step=16.ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"shard")
    (folder / ".metadata").write_bytes(b"meta")
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "integrity:   DAMAGED" in out
    assert "state.ckpt is missing" in out


def test_json_output(directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(directory / "epoch=0-step=5.ckpt"), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["status"] == "ok"
    assert (entry["epoch"], entry["global_step"], entry["epoch_batches_done"]) == (0, 5, 5)
    assert entry["plugins"] == ["checkpoint"] and "loss" in entry["metrics"]


def test_a_directory_lists_newest_first_and_flags_damage(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = directory / "last.ckpt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[:100])
    assert main([str(directory), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    statuses = {Path(e["path"]).name: e["status"] for e in report["checkpoints"]}
    assert statuses["last.ckpt"] == "damaged"
    # last.ckpt (step 16, saved when fit ended) is damaged; the newest ranked is 15.
    assert Path(report["resumes_from"]).name == "epoch=1-step=15.ckpt"
    steps = [e["global_step"] for e in report["checkpoints"] if e["status"] == "ok"]
    assert steps == sorted(steps, reverse=True)


class Payload:
    """Unpickling this would open a file: what weights_only loading refuses."""

    def __reduce__(self) -> tuple[object, ...]:
        return (open, ("/dev/null",))


def test_an_unsafe_newest_checkpoint_is_said_to_stop_last(
    directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "last" steps over damaged files but refuses an unsafe one; the listing said
    # it would resume from the next intact file, or start fresh.
    last = directory / "last.ckpt"
    state, info = load_file(last)
    write_file({**state, "extra": Payload()}, last, dict(info.record))
    assert main([str(directory), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["resumes_from"] is None and Path(report["refuses"]).name == "last.ckpt"
    assert main([str(directory)]) == 1
    assert "ckpt_path='last' refuses to resume: " in capsys.readouterr().out


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    assert main([str(tmp_path / "nope.ckpt")]) == 2


def test_through_the_hooktrain_command(directory: Path) -> None:
    pytest.importorskip("hooktrain.cli")
    done = subprocess.run(
        [sys.executable, "-m", "hooktrain", "checkpoint", str(directory / "last.ckpt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "global step: 16" in done.stdout
