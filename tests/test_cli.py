"""The command line, and the hook trace switched on by an environment variable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from hooktrain import hookimpl
from hooktrain.testing import run

BROKEN = "raise ImportError('the plugin needs libfoo')\n"
GOOD = """
from hooktrain import hookimpl

class Good:
    @hookimpl
    def on_fit_start(self, trainer):
        pass

    @hookimpl
    def log_metrics(self, metrics):
        pass
"""
COMMAND = """
def main(argv):
    print("hello from a plugin command", argv)
    return 3
"""


def hooktrain_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hooktrain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_plugins_lists_installed_from_metadata_even_when_one_is_broken(fake_dists):
    fake_dists.add("good-dist", {"good": "goodmod:Good"}, {"goodmod": GOOD}, version="1.2")
    fake_dists.add("broken-dist", {"broken": "brokenmod:Plugin"}, {"brokenmod": BROKEN})
    result = hooktrain_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:3] == ["good", "good-dist", "1.2"] for line in lines)
    assert any(line.split()[:3] == ["broken", "broken-dist", "1.0"] for line in lines)
    assert any(line.split()[:2] == ["profile", "hooktrain"] for line in lines)


def test_plugins_listing_imports_neither_torch_nor_plugins(fake_dists):
    fake_dists.add("broken-dist", {"broken": "brokenmod:Plugin"}, {"brokenmod": BROKEN})
    code = (
        "import sys\n"
        "from hooktrain.cli import main\n"
        "assert main(['plugins']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'brokenmod' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_detail_shows_hooks_and_load_errors(fake_dists):
    fake_dists.add("good-dist", {"good": "goodmod:Good"}, {"goodmod": GOOD})
    assert hooktrain_cli("plugins", "--detail").returncode == 0
    fake_dists.add("broken-dist", {"broken": "brokenmod:Plugin"}, {"brokenmod": BROKEN})
    result = hooktrain_cli("plugins", "--detail")
    assert result.returncode == 1  # a broken installation fails a CI step that checks it
    good = next(ln for ln in result.stdout.splitlines() if ln.startswith("good "))
    assert "ok: log_metrics, on_fit_start" in good
    broken = next(ln for ln in result.stdout.splitlines() if ln.startswith("broken "))
    assert "ERROR: ImportError: the plugin needs libfoo" in broken


MISSPELT = """
from hooktrain import hookimpl

class Misspelt:
    @hookimpl
    def on_train_epoch_ends(self, trainer):
        pass

class NeedsOptions:
    def __init__(self, path):
        self.path = path

    @hookimpl
    def on_fit_start(self, trainer):
        pass

class ChecksItsOption:
    def __init__(self, api_key=None):
        if api_key is None:
            raise ValueError("needs api_key")

    @hookimpl
    def on_fit_start(self, trainer):
        pass
"""


def test_detail_refuses_what_a_trainer_would_refuse(fake_dists):
    # --detail listed a misspelt hook as "ok: on_train_epoch_ends", which a Trainer
    # then refused with a PluginError.
    fake_dists.add(
        "misc-dist",
        {
            "misspelt": "miscmod:Misspelt",
            "needs_options": "miscmod:NeedsOptions",
            "checks_its_option": "miscmod:ChecksItsOption",
        },
        {"miscmod": MISSPELT},
    )
    result = hooktrain_cli("plugins", "--detail")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    misspelt = next(ln for ln in lines if ln.startswith("misspelt "))
    assert "ERROR: PluginError: plugin 'misspelt' implements 'on_train_epoch_ends'" in misspelt
    assert "did you mean 'on_train_epoch_end'?" in misspelt
    needs = next(ln for ln in lines if ln.startswith("needs_options "))
    assert (
        "ok: on_fit_start (hook arguments not checked: built with no options, it raised " in needs
    )
    assert "TypeError" in needs
    # Its own check of a required option, as the docs ask, is not a broken plugin.
    checks = next(ln for ln in lines if ln.startswith("checks_its_option "))
    assert (
        "ok: on_fit_start (hook arguments not checked: built with no options, it raised " in checks
    )
    assert "ValueError: needs api_key" in checks


def test_disabled_plugins_are_marked(fake_dists):
    fake_dists.add("good-dist", {"good": "goodmod:Good"}, {"goodmod": GOOD})
    env = {**os.environ, "HOOKTRAIN_DISABLE_PLUGINS": "good"}
    result = hooktrain_cli("plugins", "--detail", env=env)
    good = next(ln for ln in result.stdout.splitlines() if ln.startswith("good "))
    assert good.rstrip().endswith("disabled")


def test_hooks_listing_names_every_hook():
    from hooktrain import hookspecs

    result = hooktrain_cli("plugins", "--hooks")
    # Continuation lines of a description are indented; a hook name starts each entry.
    listed = {line.split()[0] for line in result.stdout.splitlines() if line[:1].strip()}
    expected = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "hooktrain_spec")}
    assert listed == expected


def test_order_with_an_unknown_plugin_fails_with_the_message():
    result = hooktrain_cli("plugins", "nonexistent-plugin")
    assert result.returncode == 2
    assert "unknown plugin 'nonexistent-plugin'" in result.stderr


def test_subcommands_come_from_entry_points(fake_dists):
    fake_dists.add(
        "cmd-dist", {"greet": "cmdmod:main"}, {"cmdmod": COMMAND}, group="hooktrain.commands"
    )
    result = hooktrain_cli("greet", "a", "b")
    assert result.returncode == 3
    assert "hello from a plugin command ['a', 'b']" in result.stdout
    # --help lists each with the distribution it comes from, importing none of them.
    help_lines = hooktrain_cli("--help").stdout.splitlines()
    assert any(line.split()[:3] == ["greet", "from", "cmd-dist;"] for line in help_lines)
    assert any(line.split()[:3] == ["new-plugin", "from", "hooktrain;"] for line in help_lines)


def test_no_installed_command_replaces_plugins_and_a_shadowed_one_is_named(fake_dists):
    # A package registering a (broken) "plugins" command took over the command that
    # diagnoses a broken installation; two claiming one name ran the first silently.
    fake_dists.add(
        "bad-dist",
        {"plugins": "nowhere:Nope", "greet": "cmdmod:main"},
        {"cmdmod": COMMAND},
        group="hooktrain.commands",
    )
    fake_dists.add(
        "other-dist", {"greet": "othermod:main"}, {"othermod": COMMAND}, group="hooktrain.commands"
    )
    listed = hooktrain_cli("plugins")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["profile", "hooktrain"] for line in listed.stdout.splitlines())
    greeted = hooktrain_cli("greet")
    assert greeted.returncode == 3
    first = "bad-dist" if "is also registered by other-dist" in greeted.stderr else "other-dist"
    ignored = next(d for d in ("bad-dist", "other-dist") if d != first)
    assert (
        f"note: command 'greet' is also registered by {ignored} 1.0, which is ignored"
        in greeted.stderr
    )


def test_help_lists_a_command_whose_name_holds_a_percent_sign(fake_dists):
    # argparse %-formats help texts: the name must not be read as a format.
    fake_dists.add(
        "odd-dist", {"fifty%off": "cmdmod:main"}, {"cmdmod": COMMAND}, group="hooktrain.commands"
    )
    result = hooktrain_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "hooktrain fifty%off --help" in result.stdout


def test_console_script_is_installed():
    executable = shutil.which("hooktrain")
    assert executable is not None
    result = subprocess.run([executable, "plugins"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "profile" in result.stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    # As `hooktrain plugins --hooks | head -1`, made certain: the pipe's reading end
    # is closed before the command writes anything.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hooktrain", "plugins", "--hooks"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_hooks_are_listed_with_their_first_sentence_whole():
    result = hooktrain_cli("plugins", "--hooks")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("all_gather_object "))
    described = " ".join(line[29:].strip() for line in lines[start : start + 4])
    assert "before the metric sums are reduced at the end of an epoch" in described


def test_hooks_are_listed_with_the_arguments_an_implementation_may_take():
    lines = hooktrain_cli("plugins", "--hooks").stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("on_train_batch_end "))
    arguments = next(line.split() for line in lines[start:] if "arguments:" in line)
    assert arguments == ["arguments:", "trainer,", "outputs,", "batch,", "batch_idx"]


def test_flags_that_would_ignore_other_input_are_refused():
    # Each printed its own view and silently dropped the rest (exit status 0).
    for args, said in (
        (["--detail", "tqdm"], "--detail lists the installed plugins; give it no plugin names"),
        (["--hooks", "tqdm"], "--hooks takes no other flag and no plugin names"),
        (["--hooks", "--selected"], "--hooks takes no other flag and no plugin names"),
        (["--selected", "tqdm"], "--selected takes no other flag and no plugin names"),
    ):
        result = hooktrain_cli("plugins", *args)
        assert result.returncode == 2, args
        assert said in result.stderr, args


def test_unknown_command_exits_2():
    result = hooktrain_cli("frobnicate")
    assert result.returncode == 2


TRACE_SCRIPT = """
from hooktrain import hookimpl
from hooktrain.testing import run

class Mine:
    name = "mine"
    @hookimpl
    def on_train_epoch_start(self, trainer):
        pass

run([Mine()], max_epochs=1, limit_train_batches=2, record=False)
"""


def test_trace_env_prints_every_hook_call_with_plugin_and_duration():
    env = {**os.environ, "HOOKTRAIN_TRACE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("[hooktrain trace]")]
    epoch_start = [ln for ln in lines if " on_train_epoch_start " in ln]
    assert len(epoch_start) == 1 and " mine " in epoch_start[0] and epoch_start[0].endswith(" us")
    # The core's defaults are traced too: two batches, two optimizer steps.
    assert len([ln for ln in lines if " optimizer_step " in ln and " core " in ln]) == 2


def test_trace_off_wraps_nothing():
    class Mine:
        @hookimpl
        def on_train_epoch_start(self, trainer):
            pass

    plugin = Mine()
    result = run([plugin], max_epochs=1, limit_train_batches=1, record=False)
    (impl,) = [
        i
        for i in result.trainer.plugin_manager.hook.on_train_epoch_start.get_hookimpls()
        if i.plugin is plugin
    ]
    assert impl.function == plugin.on_train_epoch_start
