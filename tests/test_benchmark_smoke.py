"""The benchmark script still runs (tiny sizes; nothing is asserted about time)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_quick_benchmark_prints_every_section_and_ratio():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-lightning", "--profile"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for workload in ("mlp", "conv"):
        assert f"## workload {workload}" in out
        assert re.search(rf"^ratio {workload} b/a = \d+\.\d{{3}}", out, re.MULTILINE), out
        # Either measured or skipped with the reason, never silently missing.
        assert re.search(
            rf"^ratio {workload} c/a = \d+\.\d{{3}}|c  hooktrain \+ .* skipped: ", out, re.MULTILINE
        ), out
    assert "skipped: --no-lightning" in out
    # The counted (not timed) per-step work: one table per workload, the raw loop
    # the zero it is measured from.
    tables = re.findall(r"^## calls per training step.*\n((?:   [abc] .*\n)+)", out, re.MULTILINE)
    assert len(tables) == 2, out
    for table in tables:
        assert re.search(r"^   a  raw PyTorch loop +\d+\.\d +\(\+0\.0\)$", table, re.MULTILINE)
        assert re.search(r"^   b  hooktrain, no plugins +\d+\.\d +\([+-]\d+\.\d\)$", table, re.M)
    # The profile plugin's table for variant c, or why it is missing.
    assert "hooktrain profile: fit" in out or "profile of variant c: skipped" in out
    assert re.search(r"import hooktrain, after torch +\d+\.\d+ s", out)
    assert re.search(r"`hooktrain plugins` \(whole process\) +\d+\.\d+ s", out)
    # The listing imports neither torch nor any plugin's heavy dependency.
    assert "heavy modules imported: []" in out
    for count in (0, 1, 5):
        assert re.search(rf"{count} implementation\(s\): +\d+\.\d+ us per call", out)


@pytest.mark.slow
def test_the_compile_speedup_script_runs_without_a_gpu():
    script = SCRIPT.parent / "compile_speedup.py"
    options = ["--device", "cpu", "--backend", "eager", "--rounds", "1", "--epochs", "2"]
    done = subprocess.run(
        [sys.executable, str(script), *options, "--limit-batches", "3", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^speed-up plain/compiled = \d+\.\d{3}", done.stdout, re.MULTILINE), (
        done.stdout
    )


@pytest.mark.parametrize("variant", ["a", "b"])
def test_the_instruction_counters_measured_process_trains(variant):
    # The part valgrind runs (valgrind itself is too slow for the suite): it must
    # train the variant, or the counts would be of a process that failed early.
    script = SCRIPT.parent / "count_instructions.py"
    done = subprocess.run(
        [sys.executable, str(script), "--inner", variant, "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_plugin_cost_script_prints_a_line_per_plugin():
    pytest.importorskip("hooktrain_checkpoint")
    pytest.importorskip("hooktrain_tensorboard")
    pytest.importorskip("hooktrain_tqdm")
    script = SCRIPT.parent / "plugin_costs.py"
    done = subprocess.run(
        [sys.executable, str(script), "--rounds", "2", "--steps", "1", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^   b +\d+\.\d\d ms a fit", done.stdout, re.MULTILINE), done.stdout
    for key in ("tqdm", "tensorboard", "checkpoint", "c"):
        assert re.search(rf"^   {key} +[+-]\d+\.\d\d ms ", done.stdout, re.MULTILINE), done.stdout
