"""One live run per checkpoint directory: a second one fails at setup, before it
trains; a finished or killed run leaves the directory free."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint.lock import LOCK_NAME

from hooktrain import Trainer, hookimpl
from hooktrain.errors import HookError
from hooktrain.testing import make_data, make_model

# A run that holds its directory until told to go on: it writes STARTED at its first
# batch and waits there for RELEASE.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch, torch.nn.functional as F
    from hooktrain import Trainer, hookimpl
    from hooktrain.testing import make_data, make_model

    directory, started, release = (Path(arg) for arg in sys.argv[1:])

    class Wait:
        @hookimpl
        def on_train_batch_start(self, trainer, batch, batch_idx):
            if batch_idx == 0:
                started.touch()
                deadline = time.monotonic() + 120
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

    trainer = Trainer(plugins=[("checkpoint", {"dirpath": directory}), Wait()], device="cpu")
    trainer.fit(make_model(), make_data(n=16)[0], loss_fn=F.cross_entropy,
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    """
)


class Batches:
    def __init__(self) -> None:
        self.seen = 0

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        self.seen += 1


def _fit(directory: Path, *extra: Any, ckpt_path: str | None = None) -> Trainer:
    trainer = Trainer(plugins=[("checkpoint", {"dirpath": directory}), *extra], device="cpu")
    trainer.fit(
        make_model(),
        make_data(n=16)[0],
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        ckpt_path=ckpt_path,
    )
    return trainer


def _start_holder(tmp_path: Path) -> subprocess.Popen[str]:
    started = tmp_path / "started"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "ckpt"), str(started), str(tmp_path / "go")],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120  # a start-up, however slow the machine
    while not started.exists():
        if holder.poll() is not None:
            pytest.fail(f"the holding run ended early: {holder.stderr.read()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the holding run never reached its first batch"
        time.sleep(0.05)
    return holder


def test_a_second_run_in_a_live_runs_directory_fails_before_it_trains(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    try:
        batches = Batches()
        with pytest.raises(HookError, match=f"another run \\(process {holder.pid} on host") as exc:
            _fit(tmp_path / "ckpt", batches, ckpt_path="last")
        assert exc.value.hook == "setup"
        assert batches.seen == 0
    finally:
        (tmp_path / "go").touch()
        holder.wait(timeout=120)
    assert holder.returncode == 0, holder.stderr.read()  # type: ignore[union-attr]
    # The first run ended: the directory is free again, and keeps only checkpoints.
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    _fit(tmp_path / "ckpt", ckpt_path="last")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=1.ckpt",
        "last.ckpt",
    ]


def test_a_killed_run_leaves_its_directory_free(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / "ckpt" / LOCK_NAME).exists()  # left behind, but not locked
    trainer = _fit(tmp_path / "ckpt", ckpt_path="last")
    assert trainer.global_step == 1
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_two_trainers_of_one_process_in_one_directory(tmp_path: Path) -> None:
    # POSIX locks do not exclude their own process: the plugin keeps count itself.
    refused: list[BaseException] = []

    class Nested:
        @hookimpl
        def on_fit_start(self, trainer: Trainer) -> None:
            try:
                _fit(tmp_path / "ckpt")
            except HookError as error:
                refused.append(error)

    _fit(tmp_path / "ckpt", Nested())
    assert len(refused) == 1
    assert "another run (process" in str(refused[0]) and "this one)" in str(refused[0])
