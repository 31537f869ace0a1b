"""``hooktrain new-plugin``: names, refusals, and the full round trip of a generated
plugin (install, listed by ``hooktrain plugins``, selected by name in a training, its
own generated tests passing).

The round trip installs the generated plugin with ``pip install --target`` into a
temporary folder put on ``PYTHONPATH``, so the shared environment is never changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from hooktrain.scaffold import PluginNames, create_plugin, main


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        (
            "batch-counter",
            ("batch_counter", "hooktrain-batch-counter", "hooktrain_batch_counter", "BatchCounter"),
        ),
        ("lr_monitor", ("lr_monitor", "hooktrain-lr-monitor", "hooktrain_lr_monitor", "LrMonitor")),
        ("hooktrain-ema", ("ema", "hooktrain-ema", "hooktrain_ema", "Ema")),
        ("swa2", ("swa2", "hooktrain-swa2", "hooktrain_swa2", "Swa2")),
    ],
)
def test_names_derived_from_what_the_user_typed(typed: str, expected: tuple) -> None:
    names = PluginNames.from_name(typed)
    assert (names.name, names.dist, names.package, names.cls) == expected


@pytest.mark.parametrize("bad", ["", "Batch", "2fast", "a--b", "my plugin", "x-", "ü"])
def test_unusable_names_are_refused_with_the_rule(bad: str, capsys) -> None:
    with pytest.raises(ValueError, match="lowercase letters, digits"):
        PluginNames.from_name(bad)
    assert main([bad, "--directory", "."]) == 2
    assert "error: plugin name" in capsys.readouterr().err


@pytest.mark.parametrize("reserved", ["core", "hooktrain-core"])
def test_the_cores_own_name_is_refused(reserved: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="'core' is reserved"):
        PluginNames.from_name(reserved)
    assert main([reserved, "--directory", str(tmp_path)]) == 2
    assert "'core' is reserved" in capsys.readouterr().err


@pytest.mark.parametrize("taken", ["trainer", "plugin-conformance", "none", "path"])
def test_a_name_whose_class_the_generated_code_binds_already_is_refused(taken: str) -> None:
    # new-plugin plugin-conformance wrote a class PluginConformance shadowing the
    # imported base class: pytest collected 3 tests instead of 9, with a warning.
    with pytest.raises(ValueError, match="the generated code uses for something else"):
        PluginNames.from_name(taken)


@pytest.mark.parametrize("name", ["test-helper", "testing"])
def test_a_name_making_a_class_pytest_would_collect_is_refused(name: str) -> None:
    # new-plugin test-helper wrote a class TestHelper, imported into the generated
    # tests, where pytest warned that it cannot collect it as a test class.
    with pytest.raises(ValueError, match="pytest would take for a test class"):
        PluginNames.from_name(name)
    assert PluginNames.from_name("helper-for-tests").cls == "HelperForTests"


def test_the_refused_class_names_cover_every_name_the_templates_bind(tmp_path: Path) -> None:
    import ast

    from hooktrain.scaffold import _TAKEN_CLASS_NAMES

    root = create_plugin("grad-stats", tmp_path)
    bound = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ClassDef | ast.FunctionDef):
                bound.add(node.name)
    # The class names a plugin name can make: capitalised words, no underscores.
    makeable = {n for n in bound if re.fullmatch(r"(?:[A-Z][a-z0-9]*)+", n)} - {"GradStats"}
    assert makeable <= _TAKEN_CLASS_NAMES


def test_writes_a_complete_distribution(tmp_path: Path) -> None:
    root = create_plugin("grad-stats", tmp_path, description="Log gradient statistics.")
    assert root == tmp_path / "hooktrain-grad-stats"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "hooktrain_grad_stats/__init__.py",
        "hooktrain_grad_stats/py.typed",
        "pyproject.toml",
        "tests/test_grad_stats.py",
    ]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "hooktrain-grad-stats"
    assert project["project"]["description"] == "Log gradient statistics."
    assert project["project"]["entry-points"]["hooktrain"] == {
        "grad_stats": "hooktrain_grad_stats:GradStats"
    }
    assert project["project"]["dependencies"] == ["hooktrain>=0.1"]
    assert project["tool"]["setuptools"]["package-data"] == {"hooktrain_grad_stats": ["py.typed"]}
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"unrendered placeholder in {path}"
    source = (root / "hooktrain_grad_stats/__init__.py").read_text()
    compile(source, "plugin", "exec")
    assert "class GradStats:" in source and 'name = "grad_stats"' in source


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, capsys) -> None:
    assert main(["demo", "-d", str(tmp_path)]) == 0
    assert "next:" in capsys.readouterr().out
    readme = tmp_path / "hooktrain-demo" / "README.md"
    readme.write_text("mine")
    assert main(["demo", "-d", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert readme.read_text() == "mine"
    assert main(["demo", "-d", str(tmp_path), "--force"]) == 0
    assert readme.read_text() != "mine"


def test_the_generated_code_passes_the_project_linters(tmp_path: Path) -> None:
    ruff = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if ruff.returncode != 0:
        pytest.skip("ruff is not installed")
    root = create_plugin("lint-me", tmp_path)
    # --isolated: lint as the plugin author will, in their own project, not ours.
    rules = ["--select", "E,F,W,I,B,UP,SIM,RUF", "--line-length", "100"]
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            *rules,
            "--target-version",
            "py311",
            ".",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--isolated",
            "--line-length",
            "100",
            "--check",
            ".",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.mark.slow
def test_round_trip_scaffold_install_list_train_and_test(tmp_path: Path) -> None:
    # Installed into a folder of its own put on PYTHONPATH: isolated from the shared
    # environment, yet every process below sees hooktrain and pytest as installed
    # here (a nested venv would not see a parent venv's packages).
    site = tmp_path / "site"
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    # 1. The command, as a user types it (through the CLI's subcommand dispatch).
    made = _run(
        [python, "-m", "hooktrain", "new-plugin", "step-counter", "-d", str(tmp_path)],
        tmp_path,
        env,
    )
    root = tmp_path / "hooktrain-step-counter"
    assert f"created {root}/" in made.stdout

    # 2. A real, non-editable install: builds a wheel from the generated pyproject.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "--target",
            str(site),
            str(root),
        ],
        tmp_path,
        env,
    )

    # 3. Listed from its metadata.
    listed = _run([python, "-m", "hooktrain", "plugins"], tmp_path, env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("step_counter "))
    assert row.split()[:3] == ["step_counter", "hooktrain-step-counter", "0.1.0"]

    # 4. Selected by name (with an option) in a training.
    script = textwrap.dedent(
        """
        import torch.nn.functional as F
        import torch
        from hooktrain import Trainer
        from hooktrain.testing import make_data, make_model

        trainer = Trainer(plugins=[("step_counter", {"verbose": True})], max_epochs=2,
                          device="cpu")
        train, val = make_data()
        trainer.fit(make_model(), train, val, loss_fn=F.cross_entropy,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        plugin = trainer.plugin_manager.get_plugin("step_counter")
        print("module", type(plugin).__module__, "per_epoch", plugin.per_epoch)
        """
    )
    trained = _run([python, "-c", script], tmp_path, env)
    assert "step_counter: epoch 1: 8 batches" in trained.stdout
    assert "module hooktrain_step_counter per_epoch [8, 8]" in trained.stdout

    # 5. Its own generated tests pass, using the harness's pytest fixtures.
    # The conformance suite's two-process test is left out here: the first-party
    # plugins' suites run it.
    tested = _run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-rs", "tests"],
        root,
        env,
    )
    # 3 tests of its own, 5 conformance checks; the two-process check deselected.
    assert "8 passed, 1 deselected" in tested.stdout, tested.stdout
    # The module came from the install, not from the source folder.
    imported = _run(
        [python, "-c", "import hooktrain_step_counter as m; print(m.__file__)"], tmp_path, env
    )
    assert str(site) in imported.stdout


def test_the_name_of_an_installed_plugin_is_refused_unless_forced(tmp_path: Path, capsys) -> None:
    # 'profile' is an entry point of hooktrain itself: a new distribution of that name
    # would take it over.
    assert main(["profile", "-d", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a plugin named 'profile' is installed already (hooktrain " in err
    assert "pass --force to create it anyway" in err
    assert not (tmp_path / "hooktrain-profile").exists()
    assert create_plugin("profile", tmp_path, force=True).is_dir()
