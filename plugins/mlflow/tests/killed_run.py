"""A run the resume test starts as a process: 3 epochs of 8 steps, publishing every
step, a checkpoint every 3 steps, always ``ckpt_path="last"``, logging to the MLflow
server at ``--uri``; with ``--kill-at STEP`` it sends itself SIGKILL as the batch of
that step starts (the steps before it sent, since ``max_queue=1`` sends each
publication at once)."""

from __future__ import annotations

import argparse
import os
import signal

import torch
import torch.nn.functional as F

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model


class Kill:
    name = "kill"

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(uri: str, experiment: str, ckpt_dir: str, kill_at: int = 0, log_every: int = 1) -> None:
    """The run; the test calls it in its own process for the undisturbed reference."""
    logger = {
        "tracking_uri": uri,
        "experiment_name": experiment,
        "max_queue": 1,
        "log_checkpoints": True,
    }
    plugins: list[object] = [
        # Written before training goes on: the checkpoint of step 9 is complete when
        # the kill at step 12 comes, however slow the disk (a background write of it
        # may still be under way, and the run would resume from step 6).
        ("checkpoint", {"dirpath": ckpt_dir, "every_n_train_steps": 3, "async_save": False}),
        ("mlflow", logger),
    ]
    if kill_at:
        plugins.append(Kill(kill_at))
    trainer = Trainer(
        plugins=plugins, max_epochs=3, seed=7, device="cpu", log_every_n_steps=log_every
    )
    train, val = make_data(n=128, batch_size=16, seed=3)
    trainer.fit(
        make_model(dropout=0.2),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
        ckpt_path="last",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args()
    train(args.uri, args.experiment, args.ckpt_dir, args.kill_at, args.log_every)
