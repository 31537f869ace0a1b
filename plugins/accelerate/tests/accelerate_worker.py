"""One training run with the accelerate plugin, started by the tests under
``torchrun`` (or ``accelerate launch``) on the CPU. Each process writes what it saw
to ``<out>/rank<N>.json``.

Usage: ``python accelerate_worker.py '<json config>'``; the keys are read in
``main``. Kept free of test-only tricks: it is an ordinary user script.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class StepModel(nn.Module):
    """A model with its own training and validation steps (the Lightning style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GatherCount:
    """Counts the evaluation samples that reach the metrics after gathering."""

    name = "gather-count"

    def __init__(self) -> None:
        self.samples = 0

    @hookimpl(wrapper=True)
    def gather_for_metrics(self) -> Any:
        result = yield
        if result is not None:
            self.samples += len(result[0])
        return result


class AllReduceCount:
    """Counts the gradient all-reduces DDP performs (one per bucket per synced
    backward; this tiny model fits one bucket), through a real DDP comm hook."""

    name = "allreduce-count"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # No annotations: DDP checks them, and under "from __future__ import
        # annotations" they would be strings.
        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
            self.calls += 1
            return default_hooks.allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)


def main() -> None:
    config = json.loads(sys.argv[1])
    out = Path(config["out"])
    rank = int(os.environ.get("RANK", "0"))
    options = dict(config.get("accelerate", {}))
    plugins: list[Any] = [("accelerate", options)]
    if config.get("tqdm"):
        bars = open(out / f"bars-rank{rank}.txt", "w")  # noqa: SIM115 - open for the whole run
        plugins.append(("tqdm", {"stream": bars, "terminal": True, "refresh_interval": 0}))
    if config.get("tensorboard"):
        plugins.append(("tensorboard", {"log_dir": str(out / f"runs-rank{rank}")}))
    if "checkpoint" in config:
        checkpoint = dict(config["checkpoint"])
        checkpoint["dirpath"] = str(out / checkpoint["dirpath"].format(rank=rank))
        plugins.append(("checkpoint", checkpoint))
    counter = GatherCount()
    plugins.append(counter)
    allreduces = AllReduceCount()
    if config.get("count_allreduce"):
        plugins.append(allreduces)

    trainer = Trainer(
        plugins=plugins,
        seed=0,
        max_epochs=config.get("max_epochs", 2),
        max_steps=config.get("max_steps"),
        accumulate_grad_batches=config.get("accumulate_grad_batches", 1),
        gradient_clip_val=config.get("gradient_clip_val"),
        log_every_n_steps=1,
    )
    train, val = make_data(n=config.get("n", 80), batch_size=config.get("batch_size", 8))
    fit_kwargs: dict[str, Any] = {"ckpt_path": config.get("ckpt_path")}
    if config.get("model") == "step":
        model: nn.Module = StepModel()
    else:
        model = make_model()
        fit_kwargs.update(
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            metrics={"acc": accuracy},
        )
    trainer.fit(model, train, val, **fit_kwargs)

    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "device": str(trainer.device),
        "metrics": trainer.metrics.floats(),
        "gathered_eval_samples": counter.samples,
        "gradient_allreduces": allreduces.calls,
        "weights": {k: v.tolist() for k, v in trainer.module.state_dict().items()},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
