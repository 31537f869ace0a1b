"""Sharded checkpoints (the checkpoint plugin with fsdp) in this process: a process
group of one still writes through DCP, so the format, resume, mixing with
single-file checkpoints, the command line and safe loading are checked here; the
two-process cases are in test_fsdp_distributed.py."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import HookError, Trainer
from hooktrain.testing import make_data, make_model

pytest.importorskip("hooktrain_checkpoint")
from hooktrain_checkpoint import UnsafeCheckpointError, read_info, storage
from hooktrain_checkpoint.cli import main as checkpoint_cli


def fit(plugins: list[Any], directory: Path | None, **kwargs: Any) -> tuple[Trainer, nn.Module]:
    """4 steps an epoch, 2 epochs; Adam, so that optimizer state must survive."""
    ckpt_path = kwargs.pop("ckpt_path", None)
    if directory is not None:
        options = {"dirpath": directory, "every_n_train_steps": 2, "save_top_k": 2}
        plugins = [*plugins, ("checkpoint", options)]
    model = make_model()
    trainer = Trainer(plugins=plugins, seed=0, device="cpu", max_epochs=2, **kwargs)
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
        ckpt_path=ckpt_path,
    )
    return trainer, model


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in module.state_dict().items()
    }


def assert_same(a: nn.Module, b: nn.Module) -> None:
    expected = full(b)
    for name, value in full(a).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[Trainer, nn.Module]:
    return fit([], None)


def test_a_sharded_checkpoint_is_a_directory_and_resumes_bit_identically(
    tmp_path, uninterrupted
) -> None:
    fit(["fsdp"], tmp_path, max_steps=3)
    last = tmp_path / "last.ckpt"
    assert last.is_dir()
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "state.ckpt"]
    record = read_info(last).record
    assert record["sharded"] and record["world_size"] == 1 and record["global_step"] == 3
    assert set(record["files"]) == {".metadata", "__0_0.distcp"}
    resumed, model = fit(["fsdp"], tmp_path, ckpt_path="last")
    assert resumed.global_step == 8
    assert_same(model, uninterrupted[1])
    assert resumed.metrics.floats() == pytest.approx(uninterrupted[0].metrics.floats(), abs=1e-7)


def test_both_kinds_in_one_directory_share_last_and_top_k(tmp_path, uninterrupted, capsys) -> None:
    fit(["fsdp"], tmp_path, max_steps=4)  # sharded: step 2, step 4, last
    # A plain run resumes from the sharded last and writes single files: its step-6
    # save evicts the sharded step-2 directory, and its last replaces the directory.
    fit([], tmp_path, ckpt_path="last", max_steps=6)
    kinds = {p.name: "dir" if p.is_dir() else "file" for p in tmp_path.iterdir()}
    assert kinds == {
        "epoch=0-step=4.ckpt": "dir",
        "epoch=1-step=6.ckpt": "file",
        "last.ckpt": "file",
    }
    assert checkpoint_cli([str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "sharded:     written by 1 processes" in listing
    assert listing.count("integrity:   ok") == 3
    # A sharded run resumes from the single-file last and ends as if never stopped.
    resumed, model = fit(["fsdp"], tmp_path, ckpt_path="last")
    assert resumed.global_step == 8
    assert_same(model, uninterrupted[1])
    assert (tmp_path / "last.ckpt").is_dir()


def test_inspect_and_consolidate_a_sharded_checkpoint(tmp_path, uninterrupted, capsys) -> None:
    fit(["fsdp"], tmp_path / "ckpt", max_steps=3)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint_cli([str(last), "--json"]) == 0
    import json

    described = json.loads(capsys.readouterr().out)
    assert described["status"] == "ok" and described["sharded"] is True
    assert described["global_step"] == 3
    assert described["parameters"] == {"tensors": 4, "elements": 178}
    single = tmp_path / "single.ckpt"
    assert checkpoint_cli([str(last), "--consolidate", str(single)]) == 0
    loaded = torch.load(single, weights_only=True)
    assert set(loaded["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert read_info(single).record["global_step"] == 3
    # The consolidated file resumes a plain run to the uninterrupted end.
    _, model = fit([], None, ckpt_path=single)
    assert_same(model, uninterrupted[1])


def test_a_damaged_shard_is_skipped_and_a_planted_metadata_pickle_never_runs(tmp_path) -> None:
    fit(["fsdp"], tmp_path, max_steps=4)
    shard = tmp_path / "last.ckpt" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    trainer, _ = fit(["fsdp"], tmp_path, ckpt_path="last", max_steps=4)
    # last (step 4) is damaged; the ranked step-4 directory is intact and loads.
    assert trainer.global_step == 4

    # A planted checkpoint whose metadata pickle calls a function, with a record
    # whose digests match (anyone who can write the files can write those too).
    target = tmp_path / "epoch=0-step=4.ckpt"
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    (target / ".metadata").write_bytes(pickle.dumps(Payload()))
    state, info = storage.load_file(target / "state.ckpt")
    files = dict(info.record["files"])
    files[".metadata"] = hashlib.sha256((target / ".metadata").read_bytes()).hexdigest()
    record = {k: v for k, v in info.record.items() if k not in ("sha256", "format")}
    storage.write_file(state, target / "state.ckpt", {**record, "files": files})
    with pytest.raises(HookError, match=r"pathlib\.Path\.touch is not allowed") as caught:
        fit(["fsdp"], tmp_path, ckpt_path=str(target))
    assert isinstance(caught.value.__cause__, UnsafeCheckpointError)
    assert caught.value.hook == "load_checkpoint"
    assert not marker.exists()


@pytest.mark.parametrize("saved_by", [["fsdp"], []], ids=["sharded", "single-file"])
def test_a_checkpoint_of_another_optimizer_class_is_refused_before_reading(
    tmp_path, saved_by
) -> None:
    # DCP read the shards into this run's SGD layout and failed on a missing
    # momentum buffer, in a CheckpointException (a BaseException, past every
    # `except Exception`), naming neither optimizer.
    fit(saved_by, tmp_path)
    trainer = Trainer(plugins=["fsdp", ("checkpoint", {"dirpath": tmp_path})], device="cpu")
    train, _ = make_data(n=64, batch_size=16)
    with pytest.raises(HookError, match=r"another kind of optimizer than this run's SGD"):
        trainer.fit(
            make_model(),
            train,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            ckpt_path="last",
        )


@pytest.mark.parametrize("saved_by", [["fsdp"], []], ids=["sharded", "single-file"])
def test_an_optimizer_without_tensor_state_resumes(tmp_path, saved_by) -> None:
    # Plain SGD keeps no tensors; its empty state was loaded as a full one, and DCP
    # failed with "AssertionError: Expected device to be set": no resume at all.
    def fit_sgd(max_epochs: int, directory: Path | None, plugins=("fsdp",)) -> nn.Module:
        plugins = list(plugins)
        if directory is not None:
            plugins.append(("checkpoint", {"dirpath": directory}))
        model = make_model()
        trainer = Trainer(plugins=plugins, seed=0, device="cpu", max_epochs=max_epochs)
        trainer.fit(
            model,
            make_data(n=64, batch_size=16)[0],
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            ckpt_path="last" if directory is not None else None,
        )
        return model

    fit_sgd(1, tmp_path, saved_by)
    assert_same(fit_sgd(2, tmp_path), fit_sgd(2, None))
