"""A run the resume test starts as a process: 3 epochs of 8 steps, publishing every
step, a checkpoint every 3 steps, always ``ckpt_path="last"``; with ``--kill-at
STEP`` it sends itself SIGKILL as the batch of that step starts. ``--max-queue 1``
writes each row as it is published; with the default rows wait for a flush point
(no ``flush_secs`` comes due in such a short run)."""

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


def train(log_dir: str, ckpt_dir: str, kill_at: int = 0, max_queue: int = 1000) -> None:
    """The run; the test calls it in its own process for the undisturbed reference."""
    plugins: list[object] = [
        # Written before training goes on: the checkpoint of step 9 is complete when
        # the kill at step 12 comes, however slow the disk (a background write of it
        # may still be under way, and the run would resume from step 6).
        ("checkpoint", {"dirpath": ckpt_dir, "every_n_train_steps": 3, "async_save": False}),
        ("csv", {"log_dir": log_dir, "max_queue": max_queue, "flush_secs": 3600}),
    ]
    if kill_at:
        plugins.append(Kill(kill_at))
    trainer = Trainer(plugins=plugins, max_epochs=3, seed=7, device="cpu", log_every_n_steps=1)
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
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--max-queue", type=int, default=1000)
    args = parser.parse_args()
    train(args.log_dir, args.ckpt_dir, args.kill_at, args.max_queue)
