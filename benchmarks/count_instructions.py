"""Machine instructions per training step, counted by valgrind: a figure that a busy
shared machine cannot move, beside bench.py's timings, which it can.

Run it from the repository root after installing hooktrain (and valgrind)::

    python benchmarks/count_instructions.py            # a, b and c of bench.py, on the MLP
    python benchmarks/count_instructions.py --variants a,b

Each variant of ``bench.py``'s MLP workload trains, in a fresh interpreter under
``valgrind --tool=cachegrind``, one epoch of N1 and then (in another interpreter) one
of N2 steps, after a warm-up fit of 5 steps in the same interpreter. The difference
of the two totals over N2 - N1 is the instructions of one step, with everything done
once per process or per fit (imports, setup, the warm-up) cancelled out. The script
prints them and their ratio to the raw loop's (a).

What it does not see: instructions are not time. A Python bytecode runs at fewer
instructions per cycle than torch's kernels, and each step's torch work evicts the
interpreter's caches, so a trainer's extra Python costs more time than its share of
instructions says. Variant c's progress bar writes to no terminal and prints a line
every 30 seconds of wall time, a few times a run under valgrind (about 50 times
slower), so c's count is a slight upper bound.

Each interpreter runs with a fixed hash seed and, where ``setarch`` exists, without
address randomisation: two counts of the same code then agree to within 0.2% (to 62
instructions a step with nothing else running), where they moved by 1% before.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def inner(variant: str, steps: int) -> None:
    """Train one variant for ``steps`` steps (the measured process)."""
    sys.path.insert(0, HERE)
    import bench

    workload = bench.mlp_workload(max(steps, 5), epochs=1)
    runs = {v.key: v.run for v in bench.make_variants(with_lightning=False)}
    run = runs[variant]
    if run is None:
        raise SystemExit(f"variant {variant} cannot run here (its plugins are not installed)")
    batches = workload.make_data()
    with tempfile.TemporaryDirectory() as workdir, bench.quiet():
        # Lazy imports and first-call work happen here, in both processes alike.
        run(workload, workload.make_model(), batches[:5], workdir)
        run(workload, workload.make_model(), batches[:steps], workdir)


def count(variant: str, steps: int) -> int:
    """Instructions of one process training ``variant`` for ``steps`` steps."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "cachegrind.out")
        # One thread everywhere: an idle BLAS thread spinning would be counted. A fixed
        # hash seed and, where setarch can, no address randomisation: otherwise dicts
        # lay out and buffers align differently in each process, and a count moved by
        # about 1% from one run of the same code to the next.
        env = {
            **os.environ,
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
        }
        fixed_layout = ["setarch", platform.machine(), "-R"] if shutil.which("setarch") else []
        command = [
            *fixed_layout,
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            f"--cachegrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--inner",
            variant,
            str(steps),
        ]
        subprocess.run(command, check=True, capture_output=True, env=env)
        with open(out) as file:
            for line in file:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("cachegrind wrote no summary line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="a,b,c", help="bench.py's keys: a, b, c")
    parser.add_argument("--steps", default="40,1240", help="N1,N2: the two epoch lengths")
    parser.add_argument("--inner", nargs=2, metavar=("VARIANT", "STEPS"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.inner:
        inner(options.inner[0], int(options.inner[1]))
        return
    first, second = (int(n) for n in options.steps.split(","))
    if second <= first:
        parser.error("--steps N1,N2 needs N2 > N1")
    per_step = {}
    for variant in options.variants.split(","):
        totals = [count(variant, n) for n in (first, second)]
        per_step[variant] = (totals[1] - totals[0]) / (second - first)
        print(f"{variant}: {totals[0]:,} and {totals[1]:,} instructions", flush=True)
    raw = per_step.get("a")
    print(f"\ninstructions per step (MLP, steps {first} vs {second}):")
    for variant, value in per_step.items():
        ratio = f"  {value / raw:.4f} of a" if raw else ""
        print(f"  {variant}: {value:,.0f}{ratio}")


if __name__ == "__main__":
    main()
