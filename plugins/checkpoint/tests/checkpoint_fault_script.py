"""A small training run that the fault tests start, kill and restart as a process.

Always called with ``ckpt_path="last"``, the way a user reruns one command after
every crash. It trains a model with dropout on a shuffled DataLoader with Adam and
a step LR scheduler, writes the global step to ``--progress`` after every batch
(so the test knows how far it got), and on success saves the final model and
optimizer state to ``--out``.

With ``--world-size 2`` it joins a gloo process group (rank from ``--rank``) and
implements ``all_reduce`` so that the trainer sees two processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


class Progress:
    """Reports the global step after every batch, then dawdles a little so that
    a kill can land anywhere: in a batch, in a save, between the two."""

    name = "progress"

    def __init__(self, path: str, delay: float) -> None:
        self.path = path
        self.delay = delay

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        with open(self.path, "w") as file:
            file.write(str(trainer.global_step))
        if self.delay:
            time.sleep(self.delay)


class Gloo:
    """Two processes on one machine, reduced through torch.distributed (gloo)."""

    name = "gloo"

    def __init__(self, rank: int, world_size: int, init_file: str) -> None:
        self.rank, self.world_size, self.init_file = rank, world_size, init_file

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{self.init_file}",
            rank=self.rank,
            world_size=self.world_size,
        )
        trainer.global_rank, trainer.world_size = self.rank, self.world_size

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    @hookimpl
    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    @hookimpl
    def teardown(self) -> None:
        import torch.distributed as dist

        # Both processes meet first: a gloo process whose peer tears down while its
        # own background work is in flight aborts at exit (exit code -6).
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--init-file", default="")
    args = parser.parse_args()

    plugins: list[Any] = []
    if args.world_size > 1:
        plugins.append(Gloo(args.rank, args.world_size, args.init_file))
    checkpoint_options = {"dirpath": args.dir, "every_n_train_steps": args.every}
    plugins += [("checkpoint", checkpoint_options), Progress(args.progress, args.delay)]
    trainer = Trainer(
        plugins=plugins,
        max_epochs=args.epochs,
        seed=7,
        device="cpu",
        accumulate_grad_batches=args.accumulate,
    )
    model = Net()
    train, val = make_data(n=192, batch_size=16, seed=3)
    trainer.fit(model, train, val, loss_fn=F.cross_entropy, ckpt_path="last")
    print(
        f"finished global_step={trainer.global_step} should_stop={trainer.should_stop}", flush=True
    )
    if trainer.should_stop:
        return 0  # stopped by SIGTERM: the checkpoint is on disk, nothing to report
    state = {
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_schedulers[0].state_dict(),
        "global_step": trainer.global_step,
    }
    temp = args.out + ".tmp"
    torch.save(state, temp)
    os.replace(temp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
