"""One training run, started by the tests under ``torchrun`` (or as a plain
process). Each process writes what it saw to ``<out>/rank<N>.json``.

Usage: ``python fsdp_worker.py '<json config>'``; the keys are read in ``main``.
Kept an ordinary user script: the distributed plugin is chosen by the config
(``"fsdp"`` or ``"accelerate"``), nothing else changes between them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    Subset,
    TensorDataset,
)

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class StepModel(nn.Module):
    """A model with its own steps, calling its submodule directly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.scale = nn.Parameter(torch.ones(2))  # a parameter of the root itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x) * self.scale, y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self.net(x) * self.scale, y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class SampleCount(torchmetrics.Metric):
    """How many samples the metric was updated with: a sum, which a metric state
    combined once per process more than needed would multiply."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.count += targets.numel()

    def compute(self) -> torch.Tensor:
        return self.count


class NoSamples(IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        return iter(())


class Fault:
    """Sends this process a real signal once, on rank ``rank``, at global step
    ``step``: at the end of that step's batch (``"batch-end"``), or while this
    process writes its shard of that step's checkpoint (``"shard-write"``: Python's
    audit hook sees the file being opened, in the middle of the collective save)."""

    name = "fault"

    def __init__(self, rank: int, step: int, signal_name: str, moment: str) -> None:
        self.rank = rank
        self.step = step
        self.signal = getattr(signal, signal_name)
        self.moment = moment
        self.trainer: Trainer | None = None

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.moment == "shard-write" and trainer.global_rank == self.rank:
            sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or self.trainer is None or self.trainer.global_step != self.step:
            return
        path, mode = str(args[0]), str(args[1])
        if path.endswith(f"__{self.rank}_0.distcp") and "w" in mode:
            os.kill(os.getpid(), self.signal)

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        hit = trainer.global_rank == self.rank and trainer.global_step == self.step
        if self.moment == "batch-end" and hit:
            os.kill(os.getpid(), self.signal)


def full_weights(module: nn.Module) -> dict[str, list[Any]]:
    """Every entry of the model's state as a full tensor (a collective for sharded
    ones: every process calls it)."""
    weights = {}
    for name, value in module.state_dict().items():
        full_tensor = getattr(value, "full_tensor", None)
        weights[name] = (full_tensor() if full_tensor is not None else value).tolist()
    return weights


def main() -> None:
    config = json.loads(sys.argv[1])
    out = Path(config["out"])
    rank = int(os.environ.get("RANK", "0"))
    plugin = config.get("plugin", "fsdp")
    plugins: list[Any] = [(plugin, config.get("options", {}))]
    if "checkpoint" in config:
        checkpoint = dict(config["checkpoint"])
        checkpoint["dirpath"] = str(out / checkpoint["dirpath"])
        if config.get("dirpath_per_rank"):
            checkpoint["dirpath"] += f"_rank{rank}"  # as node-local storage amounts to
        plugins.append(("checkpoint", checkpoint))
    if "fault" in config:
        fault = config["fault"]
        plugins.append(Fault(fault["rank"], fault["step"], fault["signal"], fault["moment"]))
    if "faults" in config:
        plugins.append(("faults", config["faults"]))

    trainer = Trainer(
        plugins=plugins,
        seed=0,
        max_epochs=config.get("max_epochs", 2),
        max_steps=config.get("max_steps"),
        gradient_clip_val=config.get("gradient_clip_val"),
        limit_val_batches=config.get("limit_val_batches"),
        log_every_n_steps=1,
    )
    train, val = make_data(n=config.get("n", 80), batch_size=config.get("batch_size", 8))
    fit_kwargs: dict[str, Any] = {"ckpt_path": config.get("ckpt_path")}
    if config.get("model") == "step":
        model: nn.Module = StepModel()
    else:
        model = make_model()
        if config.get("optimizer") == "instance":
            optimizer: Any = torch.optim.Adam(model.parameters(), lr=0.01)
        else:
            optimizer = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
        fit_kwargs.update(
            loss_fn=F.cross_entropy,
            optimizer=optimizer,
            metrics={"acc": accuracy, "samples": SampleCount()},
        )
    val_loaders: Any = val
    if config.get("split_validation"):
        # The same set four ways: whole on every process, split by a
        # DistributedSampler, and split by hand into each rank's own Subset.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        by_sampler = DataLoader(
            val.dataset,
            batch_size=val.batch_size,
            sampler=DistributedSampler(val.dataset, world_size, rank),
        )
        own = Subset(val.dataset, range(rank, len(val.dataset), world_size))
        # And a DistributedSampler whose shares begin with the same batch: the
        # first 2 * batch_size samples come in equal pairs, one to each process.
        x, y = val.dataset.tensors
        order = torch.arange(len(x))
        order[: 2 * val.batch_size] -= order[: 2 * val.batch_size] % 2
        paired = TensorDataset(x[order], y[order])
        same_start = DataLoader(
            paired,
            batch_size=val.batch_size,
            sampler=DistributedSampler(paired, world_size, rank, shuffle=False),
        )
        val_loaders = [val, by_sampler, DataLoader(own, batch_size=val.batch_size), same_start]
    if config.get("uneven_val"):
        # Split by hand, one batch short on rank 1: sized, so the counts are known.
        share = Subset(val.dataset, range(len(val.dataset) - rank * val.batch_size))
        val_loaders = DataLoader(share, batch_size=val.batch_size)
    if config.get("sized_and_stream_val"):
        # As many batches on each process, rank 1's from a stream without a length.
        batches = list(val)
        val_loaders = batches if rank == 0 else (batch for batch in batches)
    if config.get("empty_val_on_rank") == rank:
        # A stream without len(), so that only running it shows it is empty.
        val_loaders = DataLoader(NoSamples(), batch_size=val.batch_size)
    trainer.fit(model, train, val_loaders, **fit_kwargs)

    from hooktrain_fsdp import local_numel

    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "metrics": trainer.metrics.floats(),
        "weights": full_weights(trainer.module),
        "local_numel": local_numel(trainer.module),
        "numel": sum(p.numel() for p in trainer.module.parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
