"""The three examples train to their promised accuracy; the demo writes its files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, cwd: Path, *args: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    match = re.search(r"val_acc=([0-9.]+)", last_line)
    assert match, f"last line has no val_acc: {last_line!r}"
    return result.stderr, float(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "minimum"), [("fully_connected", 0.95), ("recurrent", 0.93)])
def test_example_reaches_its_accuracy(name, minimum, tmp_path):
    _, accuracy = run_example(name, tmp_path)
    assert accuracy >= minimum


@pytest.mark.slow
def test_main_demo_reaches_its_accuracy_and_writes_logs_and_checkpoints(tmp_path):
    _, accuracy = run_example("convolutional", tmp_path)
    assert accuracy >= 0.97
    assert list((tmp_path / "runs" / "convolutional").glob("version_*/events.out.tfevents.*"))
    checkpoints = list((tmp_path / "checkpoints" / "convolutional").iterdir())
    assert any("last" in path.name for path in checkpoints)


@pytest.mark.slow
def test_main_demo_stopped_by_sigterm_exits_as_unfinished_and_resumes(tmp_path):
    # Stopped in its first epoch (before any validation), the demo read val_loss
    # anyway and died of a KeyError, exit status 1.
    (tmp_path / "pyproject.toml").write_text(
        '[tool.hooktrain]\nplugins = ["faults"]\n'
        "[tool.hooktrain.plugin-options.faults]\n"
        'hook = "on_train_batch_end"\nstep = 5\nfault = "sigterm"\n'
    )
    stopped = subprocess.run(
        [sys.executable, str(EXAMPLES / "convolutional.py"), "--epochs", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "run again with --resume to continue" in stopped.stderr
    (tmp_path / "pyproject.toml").unlink()
    _, accuracy = run_example("convolutional", tmp_path, "--epochs", "1", "--resume")
    assert accuracy > 0.5
