"""Every code example in the docs runs.

* Each ``docs/examples/*.py`` script runs (in-process, in a temporary directory);
  ``test_*.py`` modules there run under pytest in a subprocess.
* Each example file is included by some page, and each page's ``python`` code block
  that is not an include runs too, after a small prelude (blocks marked ``py`` are
  fragments shown for reading, by convention only where running is impossible).
* The hook order the docs show (``docs/examples/hook_order.txt``) equals a live
  recording and the sequence ``tests/test_hook_order.py`` asserts.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"

SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("test_"))
TEST_MODULES = sorted(EXAMPLES.glob("test_*.py"))
PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^( *)```(\w+)[^\n]*\n(.*?)^\1```", re.S | re.M)
_SNIPPET = re.compile(r'--8<--\s+"([^"]+)"')


def _blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        indent = len(match.group(1))
        code = "\n".join(line[indent:] for line in match.group(3).splitlines())
        found.append((match.group(2), code, text[: match.start()].count("\n") + 1))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs(script: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    expected = script.with_suffix(".txt")
    if expected.exists():
        assert out == expected.read_text(encoding="utf-8"), (
            f"{script.name} no longer prints what {expected.name} (shown in the docs) says; "
            f"regenerate it with: python {script.relative_to(ROOT)} > {expected.relative_to(ROOT)}"
        )


def test_the_quickstart_prints_the_same_numbers_when_run_again(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    # docs/getting-started.md says so. Each run starts from another global random
    # state, as each new process does (torch seeds itself at random).
    script = EXAMPLES / "quickstart.py"
    monkeypatch.chdir(tmp_path)
    outputs = []
    for state in (1, 2):
        torch.manual_seed(state)
        runpy.run_path(str(script), run_name="__main__")
        outputs.append(capsys.readouterr().out)
    assert "val_acc=" in outputs[0]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("module", TEST_MODULES, ids=lambda p: p.name)
def test_example_test_module_passes(module: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(module)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_every_example_file_is_shown_in_a_page() -> None:
    included = set()
    for page in PAGES:
        for path in _SNIPPET.findall(page.read_text(encoding="utf-8")):
            included.add(path.split(":")[0])
    shown = {str(p.relative_to(ROOT)) for p in EXAMPLES.iterdir() if p.suffix in (".py", ".txt")}
    assert shown - included == set(), "example files no page includes"
    missing = {p for p in included if not (ROOT / p).exists()}
    assert not missing, f"pages include files that do not exist: {missing}"


PRELUDE = """
import torch
import torch.nn.functional as F
import hooktrain
from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model
model = make_model()
train, val = make_data()
"""

INLINE = [
    pytest.param(page, code, id=f"{page.relative_to(DOCS)}:{line}")
    for page in PAGES
    for language, code, line in _blocks(page)
    if language == "python" and not _SNIPPET.search(code)
]


@pytest.mark.parametrize(("page", "code"), INLINE)
def test_inline_python_block_runs(page: Path, code: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    exec(compile(code, f"<{page.relative_to(ROOT)}>", "exec"), namespace)


def _stripped(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def test_docs_hook_order_equals_a_live_recording() -> None:
    hook_order = runpy.run_path(str(EXAMPLES / "hook_order.py"))
    result = hook_order["run"](
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=2,
        gradient_clip_val=1.0,
    )
    live = hook_order["outline"](result.calls)
    shown = (EXAMPLES / "hook_order.txt").read_text(encoding="utf-8").splitlines()
    assert shown == live
    # The page includes the recording, so the page shows exactly this sequence.
    assert '--8<-- "docs/examples/hook_order.txt"' in (DOCS / "hook-order.md").read_text()


def test_docs_hook_order_equals_the_ground_truth_test() -> None:
    path = ROOT / "tests" / "test_hook_order.py"
    if not path.exists():
        pytest.skip("tests/test_hook_order.py does not exist")
    spec = importlib.util.spec_from_file_location("_hook_order_ground_truth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "FIT"):
        pytest.skip("tests/test_hook_order.py no longer defines FIT")
    shown = (EXAMPLES / "hook_order.txt").read_text(encoding="utf-8").splitlines()
    assert _stripped(shown) == list(module.FIT)


def test_the_outline_indents_each_phase() -> None:
    # The nesting is what makes the page readable; make sure it is not flat.
    shown = (EXAMPLES / "hook_order.txt").read_text(encoding="utf-8").splitlines()
    assert shown[0] == "setup(stage='fit')" and shown[-1] == "teardown(stage='fit')"
    assert "            on_train_batch_start(batch_idx=0)" in shown
    assert "                forward_step(batch_idx=0, stage='train')" in shown
