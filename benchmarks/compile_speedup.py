"""The speed-up of the ``compile`` plugin on ``examples/convolutional.py``'s network.

Meant for a machine with a CUDA GPU (no measurement exists yet; the machines the
plugin was written on have none)::

    python benchmarks/compile_speedup.py                          # inductor, default mode
    python benchmarks/compile_speedup.py --mode reduce-overhead   # CUDA graphs
    python benchmarks/compile_speedup.py --batch-size 256 --epochs 6
    python benchmarks/compile_speedup.py --device cpu --backend eager --rounds 1 \
        --epochs 2 --limit-batches 3                              # smoke run, no GPU

Each round trains two fresh copies of ``DigitsCNN`` (same seed, same data) with
hooktrain: one plain, one with ``("compile", {...})``; the rounds alternate which
goes first. Every epoch is timed between two device synchronisations. The first
epoch of the compiled run includes compiling and is reported on its own; the
speed-up is the median over rounds of (plain seconds per steady epoch) / (compiled
seconds per steady epoch), where steady means every epoch after the first, for
both variants. A ratio above 1 means the compiled run is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch._dynamo

from hooktrain import Trainer, hookimpl

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class EpochTimer:
    """A hooktrain plugin: seconds per training epoch, the device synchronised at
    both ends so that queued kernels count in the epoch that launched them."""

    name = "epoch_timer"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @hookimpl
    def on_train_epoch_start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    @hookimpl
    def on_train_epoch_end(self) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


def train(args: argparse.Namespace, compiled: bool) -> list[float]:
    """One fit; the seconds of each of its epochs."""
    sys.path.insert(0, EXAMPLES)
    try:
        from convolutional import DigitsCNN
        from digits_data import digits_loaders
    finally:
        sys.path.remove(EXAMPLES)
    device = torch.device(args.device)
    timer = EpochTimer(device)
    plugins: list[Any] = [timer]
    if compiled:
        torch._dynamo.reset()  # each round pays (and reports) its own compile time
        options: dict[str, Any] = {"backend": args.backend}
        if args.mode:
            options["mode"] = args.mode
        plugins.append(("compile", options))
    torch.manual_seed(0)
    model = DigitsCNN()
    loader, _ = digits_loaders(batch_size=args.batch_size, seed=0)
    trainer = Trainer(
        plugins=plugins,
        max_epochs=args.epochs,
        seed=0,
        device=device,
        limit_train_batches=args.limit_batches,
    )
    trainer.fit(model, loader)
    return timer.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="inductor's mode (reduce-overhead, ...)")
    parser.add_argument("--epochs", type=int, default=4, help="per fit; at least 2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-batches", type=int, default=None, help="batches per epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch includes compiling")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu (and --backend eager for a smoke run)")

    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, backend {args.backend}, mode {args.mode}")
    print(f"batch size {args.batch_size}, {args.epochs} epochs per fit, {args.rounds} rounds")
    ratios, first_epochs, steady = [], [], {"plain": [], "compiled": []}
    for round_index in range(args.rounds):
        order = (False, True) if round_index % 2 == 0 else (True, False)
        per_epoch: dict[bool, list[float]] = {compiled: train(args, compiled) for compiled in order}
        plain = statistics.median(per_epoch[False][1:])
        compiled = statistics.median(per_epoch[True][1:])
        steady["plain"].append(plain)
        steady["compiled"].append(compiled)
        first_epochs.append(per_epoch[True][0])
        ratios.append(plain / compiled)
        print(
            f"round {round_index}: plain {plain * 1e3:.1f} ms/epoch, compiled "
            f"{compiled * 1e3:.1f} ms/epoch, first compiled epoch {per_epoch[True][0]:.2f} s"
        )
    print(f"steady epoch, plain    (median): {statistics.median(steady['plain']) * 1e3:.1f} ms")
    print(f"steady epoch, compiled (median): {statistics.median(steady['compiled']) * 1e3:.1f} ms")
    first = statistics.median(first_epochs)
    print(f"first compiled epoch (median, compiling included): {first:.2f} s")
    print(
        f"speed-up plain/compiled = {statistics.median(ratios):.3f} "
        f"(rounds: {min(ratios):.3f} .. {max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
