"""What each first-party plugin of bench.py's variant c adds to a fit, alone.

Run it from the repository root after installing hooktrain and the plugins::

    python benchmarks/plugin_costs.py                   # fits of 2 epochs of 2 steps
    python benchmarks/plugin_costs.py --steps 300       # bench.py's MLP fit, 600 steps

It trains bench.py's MLP workload with hooktrain and no plugins (b), with each of
``tqdm``, ``tensorboard`` and ``checkpoint`` (every epoch) alone, and with the
three (c), interleaved as bench.py interleaves its variants, after one warm-up
round that is dropped. For each variant it prints the median over the rounds of
its time minus b's time in the same round, in milliseconds per fit. With short
epochs (the default) that is the plugin's fixed cost per fit: opening files,
saving, closing; with bench.py's epoch length it adds the per-step hooks.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = ("tqdm", "tensorboard", "checkpoint")


def selection(names: tuple[str, ...]) -> Callable[[str], list[Any]]:
    """bench.py's plugin options for ``names``, writing under a run's workdir."""
    import bench

    def plugins(workdir: str) -> list[Any]:
        chosen = bench.first_party_plugins(workdir)
        return [p for p in chosen if (p if isinstance(p, str) else p[0]) in names]

    return plugins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="MLP steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=101)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the quartiles need two rounds)")
    sys.path.insert(0, HERE)
    import bench

    torch.set_num_threads(1)
    workload = bench.mlp_workload(args.steps, args.epochs)
    variants = {"b": bench.hooktrain_runner(selection(()))}
    variants.update({name: bench.hooktrain_runner(selection((name,))) for name in PLUGINS})
    variants["c"] = bench.hooktrain_runner(selection(PLUGINS))
    seconds: dict[str, list[float]] = {key: [] for key in variants}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is dropped
        for key, run in variants.items():
            workdir = tempfile.mkdtemp(prefix=f"hooktrain-plugin-costs-{key}-")
            gc.collect()
            try:
                with bench.quiet():
                    took = run(workload, workload.make_model(), workload.make_data(), workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                if hasattr(os, "sync"):
                    os.sync()
            if round_index:
                seconds[key].append(took)
    print(
        f"# fits of {args.epochs} epochs of {args.steps} steps, {args.rounds} interleaved "
        f"rounds; ms per fit over b, median of the per-round differences"
    )
    base = seconds["b"]
    print(f"   b   {1e3 * statistics.median(base):8.2f} ms a fit (no plugins)")
    for key in (*PLUGINS, "c"):
        extra = [1e3 * (s - b) for s, b in zip(seconds[key], base, strict=True)]
        q1, median, q3 = statistics.quantiles(extra, n=4, method="inclusive")
        label = "all three" if key == "c" else "alone"
        print(f"   {key:<12} {median:+7.2f} ms   (q1 {q1:+.2f}, q3 {q3:+.2f})  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
