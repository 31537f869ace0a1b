"""Plugins chosen outside the script: ``HOOKTRAIN_PLUGINS`` and ``[tool.hooktrain]`` in
the project's ``pyproject.toml``, with where each came from."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hooktrain
from hooktrain.errors import ConfigurationError, PluginError

TAGGER = """
from hooktrain import hookimpl

class Tagger:
    def __init__(self, tag="default", every=1):
        self.tag = tag
        self.every = every

    @hookimpl
    def on_fit_start(self, trainer):
        pass
"""

# An unchanged script: it selects only what it selects, and prints what it got.
SCRIPT = """
import torch
import torch.nn.functional as F
from hooktrain import Trainer
from hooktrain.testing import make_data, make_model

trainer = Trainer(plugins=["profile"], max_epochs=1, limit_train_batches=2, device="cpu")
train, val = make_data(n=32)
trainer.fit(make_model(), train, loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
for name in trainer.plugin_names:
    plugin = trainer.plugin_manager.get_plugin(name)
    print(name, "|", trainer.plugin_origins[name], "|", getattr(plugin, "tag", "-"),
          getattr(plugin, "every", "-"))
"""


@pytest.fixture
def project(tmp_path: Path, fake_dists, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a ``tagger`` plugin installed and no hooktrain variables."""
    fake_dists.add(
        "tagger-dist", {"tagger": "selection_tagmod:Tagger"}, {"selection_tagmod": TAGGER}
    )
    for variable in ("HOOKTRAIN_PLUGINS", "HOOKTRAIN_DISABLE_PLUGINS"):
        monkeypatch.delenv(variable, raising=False)
    root = tmp_path / "project"
    (root / "src" / "deep").mkdir(parents=True)
    monkeypatch.chdir(root / "src" / "deep")
    return root


def write_config(root: Path, text: str) -> Path:
    path = root / "pyproject.toml"
    path.write_text(textwrap.dedent(text))
    return path


def run_script(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HOOKTRAIN_")}
    full.update(env)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=cwd, env=full, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done


def test_environment_and_pyproject_add_plugins_to_an_unchanged_script(project: Path) -> None:
    config = write_config(
        project,
        """
        [project]
        name = "demo"

        [tool.hooktrain]
        plugins = ["tagger"]

        [tool.hooktrain.plugin-options.tagger]
        tag = "from-file"
        every = 3
        """,
    )
    # An inner pyproject.toml without the table is passed over, as pytest does.
    (project / "src" / "pyproject.toml").write_text("[project]\nname = 'inner'\n")
    done = run_script(project / "src" / "deep", HOOKTRAIN_PLUGINS="selection_tagmod:Tagger")
    lines = [line.split(" | ") for line in done.stdout.splitlines()]
    assert lines == [
        ["profile", "script", "- -"],
        ["selection_tagmod:Tagger", "environment (HOOKTRAIN_PLUGINS)", "default 1"],
        ["tagger", f"{config} [tool.hooktrain]", "from-file 3"],
    ]


def test_script_options_win_key_by_key_and_a_name_is_not_added_twice(project: Path) -> None:
    write_config(
        project,
        """
        [tool.hooktrain]
        plugins = ["tagger", "profile"]
        [tool.hooktrain.plugin-options.tagger]
        tag = "from-file"
        every = 3
        """,
    )
    trainer = hooktrain.Trainer(plugins=[("tagger", {"tag": "mine"})], device="cpu")
    assert trainer.plugin_names == ["tagger", "profile"]
    tagger = trainer.plugin_manager.get_plugin("tagger")
    assert (tagger.tag, tagger.every) == ("mine", 3)
    assert trainer.plugin_origins["tagger"] == "script"


def test_options_for_a_misspelt_plugin_name_are_reported_with_the_closest(
    project: Path, capsys
) -> None:
    # Options under [tool.hooktrain.plugin-options.taggr] went to nothing, without a
    # word: the plugin ran with its defaults.
    config = write_config(
        project,
        """
        [tool.hooktrain]
        plugins = ["tagger"]
        [tool.hooktrain.plugin-options.taggr]
        tag = "from-file"
        [tool.hooktrain.plugin-options.profile]
        limit = 3
        """,
    )
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    assert trainer.plugin_manager.get_plugin("tagger").tag == "default"
    err = capsys.readouterr().err
    assert (
        f"{config} [tool.hooktrain] gives options to 'taggr', which is no installed plugin, "
        f"so it applies to nothing; did you mean 'tagger'?"
    ) in err
    # Options for an installed plugin the script may select later are no mistake.
    assert "'profile'" not in err


def test_disable_wins_over_every_selection(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    write_config(project, '[tool.hooktrain]\nplugins = ["tagger"]\ndisable = ["profile"]\n')
    monkeypatch.setenv("HOOKTRAIN_DISABLE_PLUGINS", "tagger")
    trainer = hooktrain.Trainer(plugins=["profile"], device="cpu")
    assert trainer.plugin_names == []
    err = capsys.readouterr().err
    assert "'tagger' is disabled by HOOKTRAIN_DISABLE_PLUGINS" in err
    assert "'profile' is disabled by " + str(project / "pyproject.toml") in err


@pytest.mark.parametrize("where", ["environment", "pyproject"])
def test_an_unknown_name_fails_before_training_saying_where_it_came_from(
    project: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "environment":
        monkeypatch.setenv("HOOKTRAIN_PLUGINS", "taggr")
        origin = "(selected by environment (HOOKTRAIN_PLUGINS))"
    else:
        write_config(project, '[tool.hooktrain]\nplugins = ["taggr"]\n')
        origin = f"(selected by {project / 'pyproject.toml'} [tool.hooktrain])"
    with pytest.raises(PluginError) as info:
        hooktrain.Trainer(plugins=[], device="cpu")
    message = str(info.value)
    assert message.startswith("unknown plugin 'taggr'. Did you mean 'tagger'?")
    assert message.endswith(origin)


def test_options_written_into_a_name_are_refused_saying_where_they_go(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "profile:limit=2" reads as module:attribute: it imported the standard library's
    # profile module and failed on an attribute named "limit=2".
    monkeypatch.setenv("HOOKTRAIN_PLUGINS", "profile:limit=2")
    with pytest.raises(PluginError) as info:
        hooktrain.Trainer(plugins=[], device="cpu")
    message = str(info.value)
    assert "takes no options after ':'" in message
    assert "[tool.hooktrain.plugin-options.profile]" in message
    assert "has no attribute" not in message
    # An import path keeps its attribute, and the table named works as written.
    monkeypatch.setenv("HOOKTRAIN_PLUGINS", "selection_tagmod:Tagger:tag=x")
    with pytest.raises(PluginError) as info:
        hooktrain.Trainer(plugins=[], device="cpu")
    message = str(info.value)
    assert "pass ('selection_tagmod:Tagger', {options})" in message
    table = '[tool.hooktrain.plugin-options."selection_tagmod:Tagger"]'
    assert table in message
    write_config(project, f"{table}\ntag = 'from-table'\n")
    monkeypatch.setenv("HOOKTRAIN_PLUGINS", "selection_tagmod:Tagger")
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    assert trainer.plugin_manager.get_plugin("selection_tagmod:Tagger").tag == "from-table"


def test_bad_options_from_the_file_say_where_they_came_from(project: Path) -> None:
    config = write_config(
        project,
        """
        [tool.hooktrain.plugin-options.faults]
        fault = "meltdown"
        """,
    )
    where = f"(options from {config} [tool.hooktrain])"
    # Selected by the script, options from the file.
    with pytest.raises(ConfigurationError) as info:
        hooktrain.Trainer(plugins=[("faults", {"hook": "forward_step", "step": 1})], device="cpu")
    assert str(info.value).startswith("faults: fault must be one of")
    assert str(info.value).endswith(where)
    # Selected and configured by the file.
    write_config(
        project,
        """
        [tool.hooktrain]
        plugins = ["faults"]
        [tool.hooktrain.plugin-options.faults]
        hook = "forward_step"
        step = 1
        fault = "meltdown"
        """,
    )
    with pytest.raises(ConfigurationError) as info:
        hooktrain.Trainer(plugins=[], device="cpu")
    assert str(info.value).endswith(
        f"(selected by {config} [tool.hooktrain]; options from {config} [tool.hooktrain])"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[tool.hooktrain]\nplugin = ['tagger']\n", "unknown key 'plugin'"),
        ("[tool.hooktrain]\nplugins = 'tagger'\n", "plugins must be a list of plugin names"),
        ("[tool.hooktrain]\nplugin-options = {tagger = 3}\n", "one table per plugin"),
        ("[tool.hooktrain\n", "cannot read it as TOML"),
    ],
)
def test_a_bad_table_is_refused_naming_the_file(project: Path, text: str, error: str) -> None:
    path = write_config(project, text)
    with pytest.raises(ConfigurationError, match=error) as info:
        hooktrain.Trainer(plugins=[], device="cpu")
    assert str(path) in str(info.value)


def test_selected_lists_environment_and_pyproject_with_origins(project: Path) -> None:
    config = write_config(
        project,
        """
        [tool.hooktrain]
        plugins = ["tagger", "nosuchplugin"]
        disable = ["tqdm", "csvv"]
        [tool.hooktrain.plugin-options.csv]
        log_dir = "logs"
        [tool.hooktrain.plugin-options.taggr]
        tag = "x"
        """,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKTRAIN_")}
    env["HOOKTRAIN_PLUGINS"] = "profile"
    done = subprocess.run(
        [sys.executable, "-m", "hooktrain", "plugins", "--selected"],
        cwd=project / "src" / "deep",
        env=env,
        capture_output=True,
        text=True,
    )
    # A name that is not installed would fail every run: the command says so.
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "this command cannot see them" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "environment (HOOKTRAIN_PLUGINS)" in rows["profile"]
    assert f"{config} [tool.hooktrain]" in rows["tagger"]
    assert "NOT INSTALLED" in rows["nosuchplugin"]
    assert f"disabled wherever selected: csvv ({config} [tool.hooktrain]), tqdm (" in out
    # A misspelt name disables nothing; a run says so, and so does this command.
    assert "'csvv' is no installed plugin: disabling it does nothing; did you mean 'csv'?" in out
    assert "options for 'csv' when the script selects it by name: log_dir='logs'\n" in out
    assert (
        "options for 'taggr' when the script selects it by name: tag='x' (NOT INSTALLED: "
        "they go to nothing; did you mean 'tagger'?)"
    ) in out
