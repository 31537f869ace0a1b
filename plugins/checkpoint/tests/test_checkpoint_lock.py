"""One live run per checkpoint directory: a second one fails at setup, before it
trains; a finished or killed run leaves the directory free."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint.lock import LOCK_NAME, DirectoryLock

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


PROBE = (
    "import sys; from pathlib import Path; from hooktrain_checkpoint.lock import DirectoryLock; "
    "DirectoryLock().acquire(Path(sys.argv[1])); print('acquired')"
)


def _probe(directory: Path, **options: Any) -> subprocess.CompletedProcess[str]:
    """Another process trying to take ``directory``."""
    command = [sys.executable, "-c", PROBE, str(directory)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **options)


def test_reading_the_lock_file_in_the_holding_process_keeps_the_lock(tmp_path: Path) -> None:
    # POSIX record locks end when their process closes any descriptor of the file:
    # a helper of the run that read the directory (a backup, an upload) let a second
    # run in.
    lock = DirectoryLock()
    lock.acquire(tmp_path)
    try:
        assert f"process {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
        refused = _probe(tmp_path)
        assert refused.returncode != 0
        assert f"another run (process {os.getpid()} on host" in refused.stderr
    finally:
        lock.release()
    assert _probe(tmp_path).stdout.strip() == "acquired"


def test_a_directory_removed_during_the_run_is_made_again_with_its_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The next save failed with FileNotFoundError, and the run ended with its work lost.
    directory = tmp_path / "ckpt"
    probes: list[subprocess.CompletedProcess[str]] = []

    class CleanUpScript:
        @hookimpl
        def on_train_batch_end(self, trainer: Trainer) -> None:
            if trainer.global_step == 2:
                shutil.rmtree(directory)
            elif trainer.global_step == 4:
                probes.append(_probe(directory))  # another run, after the remake

    # Written before training goes on: removed between saves, not in the middle of
    # one (whose write then fails, and says so at the next save).
    options = {"dirpath": directory, "every_n_train_steps": 1, "async_save": False}
    trainer = Trainer(plugins=[("checkpoint", options), CleanUpScript()], device="cpu")
    trainer.fit(
        make_model(),
        make_data(n=96, batch_size=16)[0],
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    assert f"{directory} was removed during the run; made it again" in capsys.readouterr().err
    (probe,) = probes
    assert probe.returncode != 0 and "another run (process" in probe.stderr
    assert "last.ckpt" in {path.name for path in directory.iterdir()}
    assert not (directory / LOCK_NAME).exists()  # released at the end, as always
    resumed = _fit(directory, ckpt_path="last")
    assert resumed.global_step == 6  # nothing left to train: the saves were all kept


# A run that takes the lock, forks a worker that lives on, and waits to be killed.
FORKS_A_WORKER = (
    "import os, sys, time; from pathlib import Path; "
    "from hooktrain_checkpoint.lock import DirectoryLock; "
    "DirectoryLock().acquire(Path(sys.argv[1])); worker = os.fork(); "
    "(time.sleep(120), os._exit(0)) if worker == 0 else None; "
    "print(worker, flush=True); time.sleep(120)"
)


def test_a_worker_forked_by_a_killed_run_does_not_keep_the_lock(tmp_path: Path) -> None:
    # A DataLoader worker forked while the run held the lock shared its descriptor:
    # after a SIGKILL of the run it kept the directory locked for as long as it lived.
    run = subprocess.Popen(
        [sys.executable, "-c", FORKS_A_WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    worker = int(run.stdout.readline())  # type: ignore[union-attr]
    try:
        run.kill()
        run.wait(timeout=60)
        assert (tmp_path / LOCK_NAME).exists()  # the killed run's, with its worker alive
        assert _probe(tmp_path).stdout.strip() == "acquired"
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_lock_file_left_by_another_user_blocks_no_one() -> None:
    # Created 0644 by a killed run of root's, it made every other user's run fail
    # with a bare PermissionError until someone deleted it.
    try:
        trial = subprocess.run(
            [sys.executable, "-c", "import hooktrain_checkpoint.lock"], user=65534, timeout=120
        )
    except PermissionError:
        trial = None
    if trial is None or trial.returncode != 0:
        pytest.skip("user 'nobody' cannot run this interpreter or import the plugin")
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o777)
        (shared / LOCK_NAME).write_text("process 1 on host gone\n")
        (shared / LOCK_NAME).chmod(0o644)
        as_nobody = _probe(shared, user=65534)
        assert as_nobody.stdout.strip() == "acquired", as_nobody.stderr
        DirectoryLock().acquire(shared)  # and root's own rerun
    finally:
        shutil.rmtree(shared)
