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
from collections.abc import Iterator
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


def post(url: str, body: Any) -> Any:
    """POST ``body`` as JSON, as TensorBoard's hparams dashboard does."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``demo``: a run that crashed in its second epoch and was resumed from the
    checkpoint of its first. ``sweep``: two fresh runs that differ in one
    hyperparameter, ``lr``."""
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
    for lr in (0.1, 0.2):
        sweep = {"log_dir": root / "runs", "name": "sweep", "hparams": {"lr": lr}}
        run([("tensorboard", sweep)], max_epochs=1, record=False)
    return root / "runs"


RUNS = ("demo/version_0", "sweep/version_0", "sweep/version_1")


# "false": TensorBoard's Python reader, which honours the restart marker only when
# the run's first file had one too; "auto": its Rust data server where installed.
@pytest.fixture(scope="module", params=["false", "auto"])
def server(log_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A TensorBoard server reading ``log_dir``, once it serves every run's
    scalars: its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(log_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        request.param,
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        tags: dict[str, Any] = {}
        while not all(tags.get(name) for name in RUNS):
            if server.poll() is not None:
                output = server.stdout.read().decode(errors="replace") if server.stdout else ""
                pytest.fail(f"tensorboard exited with {server.returncode}:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard served not every run within {STARTUP_TIMEOUT_S}s")
            try:
                tags = fetch(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        if server.stdout:
            server.stdout.close()


@pytest.mark.slow
def test_server_serves_each_step_once(server: str) -> None:
    tags = fetch(f"{server}/data/plugin/scalars/tags")
    assert {"train/loss", "epoch/loss", "val/loss", "lr/group_0"} <= set(tags["demo/version_0"])

    query = urllib.parse.urlencode({"run": "demo/version_0", "tag": "train/loss"})
    points = fetch(f"{server}/data/plugin/scalars/scalars?{query}")
    # Each point is [wall_time, step, value]. The crashed run wrote steps 9 to
    # 13 after its checkpoint; the resumed run wrote them again.
    assert [point[1] for point in points] == list(range(1, 25))

    query = urllib.parse.urlencode({"run": "demo/version_0", "tag": "epoch/loss"})
    assert [point[1] for point in fetch(f"{server}/data/plugin/scalars/scalars?{query}")] == [
        8,
        16,
        24,
    ]


@pytest.mark.slow
def test_hparams_tab_compares_runs_by_their_metrics(server: str) -> None:
    experiment = post(f"{server}/data/plugin/hparams/experiment", {"experimentName": ""})
    # Every scalar tag is a metric column, as TensorBoard builds the columns from
    # the runs themselves.
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"val/loss", "val/acc", "epoch/loss", "train/loss"} <= metrics
    hparams = {info["name"]: info for info in experiment["hparamInfos"]}
    assert hparams["lr"]["differs"] is True
    assert hparams["max_epochs"]["differs"] is True  # 3 in demo, 1 in the sweep
    assert hparams["device"]["differs"] is False

    groups = post(
        f"{server}/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )["sessionGroups"]
    by_lr = {}
    for group in groups:
        if "lr" in group["hparams"]:
            values = {value["name"]["tag"]: value for value in group["metricValues"]}
            by_lr[group["hparams"]["lr"]] = values["val/loss"]
    assert sorted(by_lr) == [pytest.approx(0.1), pytest.approx(0.2)]
    # The last validation of a one-epoch fit of 8 steps.
    assert {value["trainingStep"] for value in by_lr.values()} == {8}
