"""Real faults: a training process is SIGKILLed or SIGTERMed, rerun with
``ckpt_path="last"``, and must end bit-identical to a run nobody disturbed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("checkpoint_fault_script.py")
pytestmark = pytest.mark.slow


def _command(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--dir",
        str(tmp / f"{name}-ckpt"),
        "--out",
        str(tmp / f"{name}.pt"),
        "--progress",
        str(tmp / f"{name}.progress"),
        *extra,
    ]


def _run_to_end(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _step(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return -1


def _start_and_signal(
    command: list[str], progress: Path, at_step: int, sig: int, extra_delay: float
) -> subprocess.Popen[str]:
    """Start the run, wait until it reports ``at_step``, wait ``extra_delay`` more
    and send ``sig``. Returns the finished process."""
    progress.unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while process.poll() is None and _step(progress) < at_step:
            time.sleep(0.002)
        time.sleep(extra_delay)
        if process.poll() is None:
            process.send_signal(sig)
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process


def _assert_same_state(reference: Path, resumed: Path) -> None:
    expected = torch.load(reference, weights_only=True)
    actual = torch.load(resumed, weights_only=True)
    assert actual["global_step"] == expected["global_step"]
    flat_expected, flat_actual = _flatten(expected), _flatten(actual)
    assert flat_expected.keys() == flat_actual.keys()
    for key, value in flat_expected.items():
        other = flat_actual[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), f"{key} differs"
        else:
            assert value == other, f"{key} differs: {value!r} != {other!r}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}/{key}"))
        return out
    if isinstance(obj, list | tuple):
        out = {}
        for index, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}/{index}"))
        return out
    return {prefix: obj}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The undisturbed run (checkpointing on, as in the disturbed ones)."""
    tmp = tmp_path_factory.mktemp("reference")
    _run_to_end(_command(tmp, "reference"))
    return tmp / "reference.pt"


def test_sigkill_at_random_moments_then_rerun_is_bit_identical(
    reference: Path, tmp_path: Path
) -> None:
    # 36 optimizer steps in all (3 epochs of 12 batches); a checkpoint every 3.
    # Kills land mid-epoch, right after a save started (the write may be in
    # flight) and between saves. The seed is printed so a failure can be replayed.
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"kill schedule seed: {seed}")
    command = _command(tmp_path, "killed", "--delay", "0.01")
    progress = tmp_path / "killed.progress"
    reached = 0
    kills = 0
    for _ in range(3):
        at_step = rng.randint(reached + 1, reached + 12)
        process = _start_and_signal(
            command, progress, at_step, signal.SIGKILL, rng.uniform(0.0, 0.015)
        )
        if process.returncode == 0:
            break  # the run finished before the kill landed
        assert process.returncode == -signal.SIGKILL
        kills += 1
        reached = max(reached, _step(progress))
    assert kills >= 1
    # No half-written file is visible under a checkpoint name.
    for path in (tmp_path / "killed-ckpt").glob("*.ckpt"):
        from hooktrain_checkpoint import read_info
        from hooktrain_checkpoint.storage import verify

        verify(read_info(path))
    _run_to_end(command)
    _assert_same_state(reference, tmp_path / "killed.pt")


def test_sigterm_saves_at_the_next_batch_stops_cleanly_and_resumes_exactly(
    reference: Path, tmp_path: Path
) -> None:
    command = _command(tmp_path, "term", "--delay", "0.01", "--every", "1000")
    progress = tmp_path / "term.progress"
    process = _start_and_signal(command, progress, 7, signal.SIGTERM, 0.0)
    assert process.returncode == 0
    stopped_at = _step(progress)
    assert 7 <= stopped_at < 36
    from hooktrain_checkpoint import read_info

    info = read_info(tmp_path / "term-ckpt" / "last.ckpt")
    # Saved at the boundary where it stopped: not later, and mid-epoch here.
    assert info.record["global_step"] == stopped_at
    assert not (tmp_path / "term.pt").exists()
    rerun = _run_to_end(command)
    assert "resuming from" in rerun.stderr
    _assert_same_state(reference, tmp_path / "term.pt")


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_batch(tmp_path: Path) -> None:
    init_file = tmp_path / "rendezvous"
    processes = []
    for rank in range(2):
        command = _command(
            tmp_path,
            f"rank{rank}",
            "--delay",
            "0.01",
            "--every",
            "1000",
            "--rank",
            str(rank),
            "--world-size",
            "2",
            "--init-file",
            str(init_file),
        )
        processes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        deadline = time.monotonic() + 120
        while _step(tmp_path / "rank1.progress") < 5 and time.monotonic() < deadline:
            time.sleep(0.002)
        processes[1].send_signal(signal.SIGTERM)  # only rank 1 is told
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
        assert "should_stop=True" in stdout
    steps = [out.split("global_step=")[1].split()[0] for out, _ in outputs]
    assert steps[0] == steps[1]
    from hooktrain_checkpoint import read_info

    # Rank 0 wrote the checkpoint at the agreed step; rank 1 wrote nothing.
    assert read_info(tmp_path / "rank0-ckpt" / "last.ckpt").record["global_step"] == int(steps[0])
    assert not list((tmp_path / "rank1-ckpt").glob("*.ckpt"))
    assert "SIGTERM received" in outputs[0][1]
    assert os.path.exists(tmp_path / "rank0-ckpt")
