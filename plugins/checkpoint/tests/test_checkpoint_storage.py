"""The file format: atomic writes, integrity records, damage detection, safe loading."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import (
    DamagedCheckpointError,
    ModelCheckpoint,
    UnsafeCheckpointError,
    load_file,
    read_info,
    snapshot,
)
from hooktrain_checkpoint.storage import (
    encode,
    link_or_copy,
    verify,
    write_encoded,
    write_file,
)

from hooktrain import HookError, Trainer
from hooktrain.testing import make_data, make_model

STATE = {
    "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(3)},
    "progress": {"epoch": 1, "global_step": 7, "epoch_batches_done": 3, "epoch_complete": False},
    "rng": {"python": {"version": 3, "state": list(range(625)), "gauss": None}},
}
RECORD = {"epoch": 1, "global_step": 7, "epoch_batches_done": 3, "epoch_complete": False}


def test_a_checkpoint_is_a_plain_zip_with_a_verified_record(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    size = write_file(STATE, path, RECORD)
    assert path.stat().st_size == size
    info = read_info(path)
    assert info.record["global_step"] == 7 and len(info.record["sha256"]) == 64
    verify(info)
    # Readable without this package, by torch and by any zip reader.
    plain = torch.load(path, weights_only=True)
    assert torch.equal(plain["model"]["w"], STATE["model"]["w"])
    assert b"hooktrain-checkpoint/1" in zipfile.ZipFile(path).comment
    loaded, verified = load_file(path)
    assert verified is not None and loaded["rng"]["python"]["state"] == list(range(625))
    assert not [p for p in tmp_path.iterdir() if p.name != "a.ckpt"]  # no temporaries left


@pytest.mark.parametrize("big_last", [False, True])
def test_small_and_large_writes_make_the_same_verified_file(tmp_path: Path, big_last: bool) -> None:
    # Pieces under a MiB are gathered before hashing and writing, bigger ones go
    # straight through; a file mixing both (a big tensor in the middle of the
    # archive or as its last record) must verify and load exactly.
    big = torch.arange(600_000, dtype=torch.float32)  # 2.4 MB: one write of its own
    state = {**STATE, "model": {**STATE["model"], "big": big}}
    if big_last:
        state["zz"] = torch.arange(400_000, dtype=torch.int64)
    path = tmp_path / "big.ckpt"
    size = write_file(state, path, RECORD)
    assert path.stat().st_size == size > big.nbytes
    loaded, info = load_file(path, require_record=True)
    assert info is not None and torch.equal(loaded["model"]["big"], big)
    if big_last:
        assert torch.equal(loaded["zz"], state["zz"])
    # The same bytes as torch.save into memory, apart from the comment and its length.
    plain = io.BytesIO()
    torch.save(state, plain)
    comment_length = len(zipfile.ZipFile(path).comment)
    assert path.read_bytes()[: -comment_length - 2] == plain.getvalue()[:-2]


def test_encoded_in_memory_and_written_later_is_the_same_file(tmp_path: Path) -> None:
    state = {key: dict(value) if isinstance(value, dict) else value for key, value in STATE.items()}
    data = encode(state, RECORD)
    state["model"]["w"] = state["model"]["w"] + 1  # later changes do not reach the bytes
    direct, later = tmp_path / "direct.ckpt", tmp_path / "later.ckpt"
    write_file(STATE, direct, RECORD)
    assert write_encoded(data, later) == len(data)
    assert later.read_bytes() == direct.read_bytes()
    loaded, info = load_file(later, require_record=True)
    assert torch.equal(loaded["model"]["w"], STATE["model"]["w"])
    assert info is not None and info.record["global_step"] == 7


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncation_anywhere_is_detected(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "t.ckpt"
    write_file(STATE, path, RECORD)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DamagedCheckpointError, match=r"t\.ckpt"):
        load_file(path)


def test_every_flipped_byte_region_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "f.ckpt"
    write_file(STATE, path, RECORD)
    data = path.read_bytes()
    comment_start = read_info(path).covered_bytes
    for offset in range(0, comment_start, max(1, comment_start // 40)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(DamagedCheckpointError):
            load_file(path)


def test_a_plain_torch_save_file_loads_unverified(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save(STATE, path)
    loaded, info = load_file(path)
    assert info is None and loaded["progress"]["global_step"] == 7
    with pytest.raises(DamagedCheckpointError):
        load_file(path, require_record=True)


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("with_record", [True, False])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(
    tmp_path: Path, with_record: bool
) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    state = {**STATE, "model": {"w": Payload(marker)}}
    # With a valid record, integrity passes: safety must come from the loading.
    if with_record:
        write_file(state, path, RECORD)
    else:
        torch.save(state, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt") as info:
        load_file(path)
    assert "could run code" in str(info.value)
    # What torch refused, named, without its terminal colours or its advice on
    # loading the file unsafely.
    assert "Unsupported global" in str(info.value)
    assert "\x1b" not in str(info.value) and "two options" not in str(info.value)
    assert not marker.exists()


def test_a_malicious_last_checkpoint_stops_the_resume(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    write_file({**STATE, "model": {"w": Payload(marker)}}, tmp_path / "last.ckpt", RECORD)
    trainer = Trainer(plugins=[ModelCheckpoint(dirpath=tmp_path)], device="cpu")
    train, _ = make_data()
    with pytest.raises(HookError, match=r"refusing to load checkpoint .*last\.ckpt") as info:
        trainer.fit(
            make_model(),
            train,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            ckpt_path="last",
        )
    assert isinstance(info.value.__cause__, UnsafeCheckpointError)
    assert not marker.exists()


def test_link_or_copy_replicates_a_complete_file(tmp_path: Path) -> None:
    write_file(STATE, tmp_path / "a.ckpt", RECORD)
    link_or_copy(tmp_path / "a.ckpt", tmp_path / "last.ckpt")
    (tmp_path / "a.ckpt").unlink()
    loaded, info = load_file(tmp_path / "last.ckpt")
    assert info is not None and torch.equal(loaded["model"]["b"], torch.zeros(3))


def test_snapshot_is_independent_of_the_live_state() -> None:
    weight = torch.ones(3)
    state = {"model": {"a": weight, "tied": weight}, "list": [weight, 1, "x"], "t": (2, weight)}
    copy = snapshot(state)
    weight.add_(1)
    assert torch.equal(copy["model"]["a"], torch.ones(3))
    assert copy["model"]["a"] is copy["model"]["tied"] is copy["list"][0] is copy["t"][1]
    assert copy["list"][1:] == [1, "x"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from hooktrain_checkpoint.storage import write_file
    target = sys.argv[1]
    state = {"model": {"w": torch.randn(2_000_000)}, "progress": {}}
    print("ready", flush=True)
    for step in range(1_000_000):
        state["model"]["w"].fill_(step)
        write_file(state, target, {"global_step": step})
    """
)


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        seen = set()
        for delay in (0.05, 0.13, 0.21, 0.34):
            time.sleep(delay)
            process.send_signal(signal.SIGSTOP)  # freeze mid-whatever, then inspect
            if target.exists():
                loaded, info = load_file(target)
                assert info is not None
                value = float(loaded["model"]["w"][0])
                assert torch.all(loaded["model"]["w"] == value)
                assert value == info.record["global_step"]
                seen.add(value)
            process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if target.exists():
        verify(read_info(target))
    temporaries = list(tmp_path.glob(".*.tmp"))
    assert len(temporaries) <= 1  # the one being written when the kill landed
    # A later run removes what the killed one left.
    trainer = Trainer(
        plugins=[ModelCheckpoint(dirpath=tmp_path)], limit_train_batches=1, device="cpu"
    )
    trainer.fit(
        make_model(),
        make_data(n=16)[0],
        loss_fn=F.cross_entropy,
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
    )
    assert not list(tmp_path.glob(".*.tmp"))


def _unwritable_directory() -> Path | None:
    """A directory nobody may create files in, root included (sysfs on Linux)."""
    sysfs = Path("/sys")
    try:
        probe = sysfs / ".hooktrain-probe"
        probe.touch()
        probe.unlink()
    except OSError:
        return sysfs if sysfs.is_dir() else None
    return None


@pytest.mark.skipif(_unwritable_directory() is None, reason="needs a directory root cannot write")
def test_an_unwritable_dirpath_fails_before_the_first_batch() -> None:
    # On a read-only mount the run trained until its first save, an epoch in.
    trainer = Trainer(plugins=[("checkpoint", {"dirpath": _unwritable_directory()})], device="cpu")
    with pytest.raises(HookError, match="cannot write checkpoints to '/sys'") as excinfo:
        trainer.fit(
            make_model(),
            make_data()[0],
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
    assert excinfo.value.hook == "setup"
    assert trainer.global_step == 0
