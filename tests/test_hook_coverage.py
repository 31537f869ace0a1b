"""No hook without documentation, a caller and a test; no core error undocumented.

In the spirit of datasette's tests that every plugin hook is documented: these tests
fail when someone adds a hookspec (or an error message) and stops there.

* every hookspec has a docstring (the reference page is rendered from it);
* the reference page renders the whole hookspecs module, and the hook-order page
  names every hook (``tests/test_docs_build.py`` checks the built HTML);
* the loop really calls every hook, in one of a few small runs;
* some test other than this file mentions every hook by name;
* every message the core raises a ``HooktrainError`` with is on the troubleshooting page.

Each check is a function that returns what is missing, and is also tested on a
made-up input, so that it is known to be able to fail.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from hooktrain import HookError, Trainer, hookimpl, hookspecs
from hooktrain.testing import HookRecorder, run

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CORE = ROOT / "core" / "hooktrain"
THIS = Path(__file__).resolve()


def hook_names() -> list[str]:
    return [name for name, fn in vars(hookspecs).items() if hasattr(fn, "hooktrain_spec")]


HOOKS = hook_names()


# ---------------------------------------------------------------------- documentation


def undocumented(functions: dict[str, object]) -> list[str]:
    """Names whose docstring is missing or too short to say when and what."""
    return [name for name, fn in functions.items() if len(inspect.getdoc(fn) or "") < 20]


def test_every_hook_has_a_docstring() -> None:
    assert len(HOOKS) >= 40
    assert undocumented({name: getattr(hookspecs, name) for name in HOOKS}) == []


def test_undocumented_detects_a_bare_hook() -> None:
    def on_bogus(trainer):  # a hookspec someone forgot to document
        pass

    assert undocumented({"on_bogus": on_bogus, "setup": hookspecs.setup}) == ["on_bogus"]


def test_the_reference_page_renders_every_hook() -> None:
    page = (DOCS / "reference" / "hooks.md").read_text(encoding="utf-8")
    directive = re.search(r"^::: hooktrain\.hookspecs\n((?:    .*\n)*)", page, re.M)
    assert directive, "docs/reference/hooks.md no longer renders hooktrain.hookspecs"
    # A member list or filter would let a new hook be left out of the reference.
    assert "members:" not in directive.group(1) and "filters:" not in directive.group(1)
    assert "show_if_no_docstring: true" in directive.group(1)


def not_mentioned(names: Iterable[str], text: str) -> list[str]:
    return [name for name in names if not re.search(rf"\b{name}\b", text)]


def test_the_hook_order_page_names_every_hook() -> None:
    page = (DOCS / "hook-order.md").read_text(encoding="utf-8")
    recorded = (DOCS / "examples" / "hook_order.txt").read_text(encoding="utf-8")
    assert not_mentioned(HOOKS, page + recorded) == []
    assert not_mentioned(["on_bogus"], page) == ["on_bogus"]


# ---------------------------------------------------------------------- the loop calls each


class _RaiseAtEpochStart:
    name = "raiser"

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        raise RuntimeError("interrupted on purpose")


class _TwoProcesses:
    """Claims a world of two processes that saw the same batches, so that the loop
    calls ``all_reduce`` and ``all_gather_object``."""

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.world_size = 2

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2

    @hookimpl
    def all_gather_object(self, obj: object) -> list[object]:
        return [obj, obj]


class _SaveAtFirstEpochEnd:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 0:
            torch.save(trainer.dump_checkpoint(), self.path)


def test_the_loop_calls_every_hook(tmp_path: Path) -> None:
    seen: set[str] = set()
    path = tmp_path / "ckpt.pt"
    small = {"limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1}
    runs = [
        run([_SaveAtFirstEpochEnd(path)], gradient_clip_val=1.0, **small),
        run(max_epochs=3, fit_kwargs={"ckpt_path": path}, **small),
        run([_TwoProcesses()], max_epochs=1, **small),
        run(stage="validate", limit_val_batches=1),
        run(stage="test", limit_test_batches=1),
        run(stage="predict", limit_predict_batches=1),
    ]
    for result in runs:
        seen.update(result.recorder.names())
    recorder = HookRecorder()
    with pytest.raises(HookError, match="interrupted on purpose"):
        run([_RaiseAtEpochStart(), recorder], record=False)
    seen.update(recorder.names())
    never_called = sorted(set(HOOKS) - seen)
    assert never_called == [], f"hooks the loop never called: {never_called}"


# ---------------------------------------------------------------------- a test mentions each


def _identifiers(path: Path) -> set[str]:
    """Every name, attribute, function name and string constant in a Python file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"\w+", node.value))
    return found


def _test_files() -> list[Path]:
    files = list((ROOT / "tests").rglob("test_*.py"))
    files += list(ROOT.glob("plugins/*/tests/**/test_*.py"))
    files += list((DOCS / "examples").glob("test_*.py"))
    return sorted(p for p in files if p.resolve() != THIS)


def untested(names: Iterable[str], files: Iterable[Path]) -> list[str]:
    mentioned: set[str] = set()
    for path in files:
        mentioned |= _identifiers(path)
    return [name for name in names if name not in mentioned]


def test_every_hook_is_exercised_by_a_test() -> None:
    files = _test_files()
    assert any(p.name == "test_hook_order.py" for p in files) or len(files) > 3
    assert untested(HOOKS, files) == []


def test_untested_detects_a_hook_no_test_mentions(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_x(recorder):\n    assert recorder.count('setup')\n")
    assert untested(["setup", "on_bogus"], [sample]) == ["on_bogus"]


# ---------------------------------------------------------------------- errors documented


def _error_classes() -> set[str]:
    from hooktrain import errors

    return {
        name
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.HooktrainError)
    }


def core_error_messages(files: Iterable[Path], classes: set[str]) -> list[tuple[str, str]]:
    """``(where, the longest literal part of the message)`` of every construction of a
    hooktrain error class in ``files``."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name not in classes:
                continue
            parts = [
                sub.value
                for sub in ast.walk(node.args[0])
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            ]
            if parts:
                longest = max(parts, key=lambda s: len(s.strip())).strip()
                found.append((f"{path.name}:{node.lineno}", longest))
    return found


def undocumented_errors(messages: list[tuple[str, str]], page: str) -> list[tuple[str, str]]:
    return [(where, text) for where, text in messages if text not in page]


def test_every_core_error_message_is_on_the_troubleshooting_page() -> None:
    messages = core_error_messages(sorted(CORE.glob("*.py")), _error_classes())
    assert len(messages) >= 30
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    missing = undocumented_errors(messages, page)
    assert missing == [], (
        "errors raised in core/hooktrain but not explained in docs/troubleshooting.md: "
        + "; ".join(f"{where}: {text!r}" for where, text in missing)
    )


def test_undocumented_errors_detects_a_new_message(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "def f(x):\n"
        "    raise ConfigurationError(f'the frobnicator {x} is out of range, turn it down')\n"
        "    raise ValueError('not a hooktrain error, not required')\n"
    )
    messages = core_error_messages([source], {"ConfigurationError"})
    assert messages == [("mod.py:2", "is out of range, turn it down")]
    assert undocumented_errors(messages, "nothing here") == messages
    assert (
        undocumented_errors(messages, "`the frobnicator <x> is out of range, turn it down`") == []
    )
