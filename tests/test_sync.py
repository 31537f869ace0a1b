"""No host-device synchronisation per step: running values stay on the device.

Reading a tensor as a Python value (``.item()``, ``float()``, ``bool()``...) makes
the host wait for the device. The core and the first-party plugins may do that at
log intervals, epoch ends and checkpoints, never per step. Every such conversion is
counted over runs of N and 2N steps with a log interval longer than either: the
count must not grow with the number of steps. The counter is the conformance
suite's (`hooktrain.conformance_support.HostSyncCounter`), which every plugin's own
suite runs as well.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pytest

from hooktrain import hookimpl
from hooktrain.conformance_support import HostSyncCounter
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data, run

STEPS = 12
BATCH = 8


def first_party(tmp_path: Any) -> list[Any]:
    """The first-party plugins that are installed, set up to do the most per step."""
    wanted: list[Any] = [
        # Redraw on every batch.
        ("tqdm", {"stream": io.StringIO(), "terminal": True, "refresh_interval": 0.0}),
        ("tensorboard", {"log_dir": str(tmp_path / "tb")}),
        ("csv", {"log_dir": str(tmp_path / "csv"), "max_queue": 1}),
        (
            "checkpoint",
            {"dirpath": str(tmp_path / "ckpt"), "every_n_epochs": 1, "monitor": "val_loss"},
        ),
        ("early_stopping", {"monitor": "val_loss", "verbose": False}),
        ("amp", {"precision": "bf16"}),
        # Its values are computed at publish points only, which these runs never reach.
        ("monitor", {}),
    ]
    installed = installed_plugins()
    return [item for item in wanted if item[0] in installed]


class ConversionCounter:
    """`HostSyncCounter` (the conformance suite's counter: every conversion, by where
    it came from) over one run of ``steps`` steps per epoch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counter = HostSyncCounter(monkeypatch)

    def count_run(
        self,
        plugins: list[Any],
        steps: int,
        metrics: dict[str, Any] | None = None,
        log_every_n_steps: int | None = None,
    ) -> Counter[str]:
        return self.counter.count(
            lambda: run(
                plugins,
                record=False,
                max_epochs=2,
                data=make_data(n=steps * BATCH, batch_size=BATCH),
                fit_kwargs={"metrics": metrics} if metrics is not None else None,
                # By default longer than any run here: step metrics are never published.
                log_every_n_steps=log_every_n_steps or 10 * steps,
            )
        )


def _plugin_sets(tmp_path: Any) -> dict[str, list[Any]]:
    return {"core": [], "first-party": first_party(tmp_path)}


@pytest.mark.parametrize("which", ["core", "first-party"])
def test_conversions_do_not_grow_with_steps(which, tmp_path, monkeypatch):
    counter = ConversionCounter(monkeypatch)
    short = counter.count_run(_plugin_sets(tmp_path / "short")[which], STEPS)
    long = counter.count_run(_plugin_sets(tmp_path / "long")[which], 2 * STEPS)
    # Two epochs of validation, epoch ends and checkpoints convert something; the
    # steps themselves convert nothing.
    assert short == long, (
        f"tensor-to-host conversions grew with the number of steps: {dict(short)} over "
        f"{2 * STEPS} steps, {dict(long)} over {4 * STEPS} steps"
    )


def test_torchmetrics_metrics_add_no_conversion_per_step(monkeypatch):
    torchmetrics = pytest.importorskip("torchmetrics")

    def metrics() -> dict[str, Any]:
        # validate_args=False: torchmetrics' own input checks read the device at
        # every update (documented in docs/metrics.md); the loop itself must not.
        # (Its AUROC is left out: on the CPU only, where reading a tensor waits for
        # nothing, it tests whether the scores are probabilities with a bool().)
        options = {"num_classes": 2, "validate_args": False}
        return {
            "f1": torchmetrics.F1Score("multiclass", average="macro", **options),
            "precision": torchmetrics.Precision("multiclass", average="macro", **options),
        }

    counter = ConversionCounter(monkeypatch)
    short = counter.count_run([], STEPS, metrics())
    long = counter.count_run([], 2 * STEPS, metrics())
    assert short == long, f"{dict(short)} over {2 * STEPS} steps, {dict(long)} over {4 * STEPS}"


class Listens:
    """A logger that does nothing: publications happen only when someone listens."""

    name = "listens"

    @hookimpl
    def log_metrics(self, metrics):
        pass


def test_the_monitor_adds_no_read_to_a_publication(monkeypatch):
    pytest.importorskip("hooktrain_monitor")
    counter = ConversionCounter(monkeypatch)
    # A publication every 2 steps: the monitor's values (the gradient norm a device
    # tensor, the rest Python numbers) join the loss in the trainer's one transfer.
    without = counter.count_run([Listens()], STEPS, log_every_n_steps=2)
    monitored = counter.count_run([("monitor", {}), Listens()], STEPS, log_every_n_steps=2)
    # (One tensor is read with item(), several with one tolist(): count reads.)
    assert sum(monitored.values()) == sum(without.values()), (dict(monitored), dict(without))


def test_first_party_plugins_under_test_are_installed(tmp_path):
    names = [name for name, _ in first_party(tmp_path)]
    # The core's own package is always there; report which plugins were covered.
    assert set(names) <= {
        "tqdm",
        "tensorboard",
        "csv",
        "checkpoint",
        "early_stopping",
        "amp",
        "monitor",
    }
    if not names:
        pytest.skip("no first-party plugin is installed: only the core was checked")


class ReadsLossEveryStep:
    """What the test must catch: a plugin reading the loss as a float every step."""

    name = "reads_loss"

    @hookimpl
    def on_train_batch_end(self, trainer):
        trainer.metrics["loss"]  # Metrics converts the device tensor here


def test_the_counter_catches_a_per_step_read(monkeypatch):
    counter = ConversionCounter(monkeypatch)
    short = counter.count_run([ReadsLossEveryStep()], STEPS)
    long = counter.count_run([ReadsLossEveryStep()], 2 * STEPS)
    assert sum(long.values()) - sum(short.values()) >= 2 * STEPS
