"""Training-thread cost of a checkpoint save, for a small and a ~100 MB model.

Run: ``python plugins/checkpoint/benchmarks/bench_checkpoint_save.py``. For each
model it trains a few steps saving every ``EVERY`` steps, with the background
writer and without it, and reports the median time the training thread spent
per save, the median write time, and the median step time while a write was in
flight compared with steps without one (what the writer steals from training).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hooktrain import Trainer, hookimpl


class StepTimer:
    """Wall time of every batch, and whether a checkpoint write was in flight."""

    name = "timer"

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.times: list[tuple[float, bool]] = []
        self._start = 0.0

    @hookimpl
    def on_train_batch_start(self) -> None:
        self._start = time.perf_counter()
        self._busy = self.checkpoint._writer.busy

    @hookimpl
    def on_train_batch_end(self) -> None:
        # Registered before the checkpoint plugin: measures the step, not the save.
        self.times.append((time.perf_counter() - self._start, self._busy))


def model_of(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def measure(features: int, hidden: int, steps: int, every: int, async_save: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = model_of(features, hidden)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    data = TensorDataset(torch.randn(steps * 8, features), torch.randint(0, 10, (steps * 8,)))
    loader = DataLoader(data, batch_size=8)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ModelCheckpoint(
            dirpath=directory, every_n_train_steps=every, async_save=async_save, save_top_k=1
        )
        timer = StepTimer(checkpoint)
        trainer = Trainer(plugins=[timer, checkpoint], max_epochs=1, device="cpu", seed=0)
        trainer.fit(
            model, loader, loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, lr=0.01)
        )
    quiet = [t for t, busy in timer.times[1:] if not busy]
    busy = [t for t, busy in timer.times[1:] if busy]
    return {
        "model MB": round(size_mb, 1),
        "async": async_save,
        "saves": len(checkpoint.save_costs),
        "train-thread ms/save": round(1e3 * statistics.median(checkpoint.save_costs), 1),
        "of which waiting ms": round(1e3 * statistics.median(checkpoint.wait_costs), 1),
        "write ms": round(1e3 * statistics.median(checkpoint.write_costs), 1),
        "step ms (no write)": round(1e3 * statistics.median(quiet), 1) if quiet else None,
        "step ms (write in flight)": round(1e3 * statistics.median(busy), 1) if busy else None,
    }


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for features, hidden, steps, every in ((64, 128, 400, 100), (2500, 10000, 30, 10)):
        for async_save in (True, False):
            print(measure(features, hidden, steps, every, async_save))


if __name__ == "__main__":
    main()
