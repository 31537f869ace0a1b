"""A real TensorBoard server, on loopback, serves what a crashed-and-resumed run wrote."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from hooktrain import hookimpl
from hooktrain.testing import run

STARTUP_TIMEOUT_S = 90


class SaveAfterFirstEpoch:
    name = "saver"

    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Any) -> None:
        if trainer.current_epoch == 0:
            torch.save(trainer.dump_checkpoint(), self.path)


class CrashInSecondEpoch:
    name = "crash"

    @hookimpl
    def on_train_batch_end(self, trainer: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == 4:
            raise RuntimeError("simulated crash")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def resumed_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    ckpt = root / "epoch0.ckpt"
    options = {"log_dir": root / "runs", "name": "demo"}
    with pytest.raises(Exception, match="simulated crash"):
        run(
            [("tensorboard", options), SaveAfterFirstEpoch(ckpt), CrashInSecondEpoch()],
            max_epochs=3,
            log_every_n_steps=1,
            record=False,
        )
    run(
        [("tensorboard", options)],
        max_epochs=3,
        log_every_n_steps=1,
        record=False,
        fit_kwargs={"ckpt_path": ckpt},
    )
    return root / "runs"


@pytest.mark.slow
# "false": TensorBoard's Python reader, which honours the restart marker only when
# the run's first file had one too; "auto": its Rust data server where installed.
@pytest.mark.parametrize("load_fast", ["false", "auto"])
def test_server_serves_each_step_once(resumed_log_dir: Path, load_fast: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(resumed_log_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        load_fast,
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        tags: dict[str, Any] = {}
        while not tags.get("demo/version_0"):
            if server.poll() is not None:
                output = server.stdout.read().decode(errors="replace") if server.stdout else ""
                pytest.fail(f"tensorboard exited with {server.returncode}:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard served no scalars within {STARTUP_TIMEOUT_S}s")
            try:
                tags = fetch(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        assert {"train/loss", "epoch/loss", "val/loss", "lr/group_0"} <= set(tags["demo/version_0"])

        query = urllib.parse.urlencode({"run": "demo/version_0", "tag": "train/loss"})
        points = fetch(f"{base}/data/plugin/scalars/scalars?{query}")
        # Each point is [wall_time, step, value]. The crashed run wrote steps 9 to
        # 13 after its checkpoint; the resumed run wrote them again.
        assert [point[1] for point in points] == list(range(1, 25))

        query = urllib.parse.urlencode({"run": "demo/version_0", "tag": "epoch/loss"})
        assert [point[1] for point in fetch(f"{base}/data/plugin/scalars/scalars?{query}")] == [
            8,
            16,
            24,
        ]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        if server.stdout:
            server.stdout.close()
