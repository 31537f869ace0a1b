"""Exclusive roles: two selected plugins taking one role are refused when the Trainer
is built, and ``hooktrain plugins --check`` says so without building a model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import hooktrain
from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError, PluginError
from hooktrain.plugins import check_exclusive_roles, installed_plugins


class Precision:
    """A third-party plugin taking the role ``precision``."""

    name = "my_precision"
    exclusive_roles = ("precision",)

    @hookimpl
    def on_fit_start(self) -> None:
        pass


class Sharding:
    name = "my_sharding"
    exclusive_roles = ("distributed",)
    exclusive_role_hints = {"distributed": "my_sharding shards by itself; drop the other one."}


class OtherPrecision:
    name = "other_precision"
    exclusive_roles = ("precision", "optimizer-step")


def test_two_plugins_with_one_role_are_refused_naming_both_and_the_role() -> None:
    with pytest.raises(ConfigurationError) as info:
        hooktrain.Trainer(plugins=[Precision(), Sharding(), OtherPrecision()], device="cpu")
    message = str(info.value)
    assert (
        "plugins 'my_precision' and 'other_precision' both take the exclusive role 'precision'"
        in message
    )


def test_plugins_with_different_roles_or_none_build() -> None:
    trainer = hooktrain.Trainer(plugins=[Precision(), Sharding(), "profile"], device="cpu")
    assert trainer.plugin_names == ["my_precision", "my_sharding", "profile"]


def test_the_hint_of_a_plugin_for_the_role_is_in_the_message() -> None:
    class OtherSharding:
        name = "other_sharding"
        exclusive_roles = ["distributed"]  # a list is accepted as well as a tuple

    with pytest.raises(ConfigurationError, match="my_sharding: my_sharding shards by itself"):
        hooktrain.Trainer(plugins=[OtherSharding(), Sharding()], device="cpu")


def test_a_bare_string_is_refused_rather_than_read_as_letters() -> None:
    class Typo:
        name = "typo"
        exclusive_roles = "precision"

    with pytest.raises(PluginError, match=r"exclusive_roles = \('precision',\)"):
        hooktrain.Trainer(plugins=[Typo()], device="cpu")


def test_a_plugin_registered_during_a_run_is_checked_too() -> None:
    trainer = hooktrain.Trainer(plugins=[Precision()], device="cpu")
    with pytest.raises(ConfigurationError, match="exclusive role 'precision'"):
        trainer.plugin_manager.register(OtherPrecision(), "late")
    assert trainer.plugin_manager.get_plugin("late") is None


def test_check_returns_who_holds_each_role() -> None:
    holders = check_exclusive_roles([("a", Precision()), ("b", Sharding())])
    assert holders == {"precision": "a", "distributed": "b"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKTRAIN_")}
    return subprocess.run(
        [sys.executable, "-m", "hooktrain", "plugins", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_check_cli_fails_for_amp_with_accelerate_and_passes_a_compatible_set() -> None:
    installed = installed_plugins()
    if not {"amp", "accelerate", "checkpoint"} <= set(installed):
        pytest.skip("needs hooktrain-amp, hooktrain-accelerate and hooktrain-checkpoint")
    refused = _cli("--check", "amp", "accelerate")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "plugins 'amp' and 'accelerate' both take the exclusive role 'precision'" in (
        refused.stderr
    )
    passed = _cli("--check", "accelerate", "checkpoint", "profile")
    assert passed.returncode == 0, passed.stderr
    lines = passed.stdout.splitlines()
    assert lines[0] == (
        "compatible: exclusive roles taken: checkpoint-io (checkpoint), "
        "distributed (accelerate), precision (accelerate)"
    )
    # The call order listing: accelerate's backward before the core's default.
    backward = next(line for line in lines if line.split()[0] == "backward")
    assert backward.split(None, 1)[1] == "accelerate -> core (default)"


# Run in a fresh process: loads and constructs every first-party plugin the way
# --check does, then reports whether anything touched a device or built a model.
NO_DEVICE_PROBE = """
import sys
import torch

built = []
original_init = torch.nn.Module.__init__

def counting_init(self, *args, **kwargs):
    built.append(type(self).__name__)
    original_init(self, *args, **kwargs)

torch.nn.Module.__init__ = counting_init
from hooktrain.cli import main

code = main(["plugins", "--check", *sys.argv[1:]])
import torch.distributed as dist
print("exit", code)
print("modules built", built)
print("cuda initialised", torch.cuda.is_initialized())
print("process group", dist.is_available() and dist.is_initialized())
print("accelerate state", bool(sys.modules.get("accelerate.state")
      and sys.modules["accelerate.state"].PartialState._shared_state))
"""


def test_check_builds_no_model_and_touches_no_device() -> None:
    names = [n for n in ("tqdm", "tensorboard", "checkpoint", "accelerate", "early_stopping")]
    names = [n for n in names if n in installed_plugins()] + ["profile"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKTRAIN_")}
    done = subprocess.run(
        [sys.executable, "-c", NO_DEVICE_PROBE, *names],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "exit 0" in done.stdout, done.stdout + done.stderr
    assert "modules built []" in done.stdout
    assert "cuda initialised False" in done.stdout
    assert "process group False" in done.stdout
    assert "accelerate state False" in done.stdout


class ClipStep:
    name = "clip_step"

    @hookimpl
    def optimizer_step(self, optimizer):
        optimizer.step()
        return True


class LookaheadStep:
    name = "lookahead_step"

    @hookimpl
    def optimizer_step(self, optimizer):
        optimizer.step()
        return True


def test_check_cli_notes_a_compute_hook_that_two_plugins_answer(capsys) -> None:
    # Both expect to step; only the first ever did, and --check said nothing.
    from hooktrain.cli import main

    clip, lookahead = f"{__name__}:ClipStep", f"{__name__}:LookaheadStep"
    code = main(["plugins", "--check", clip, lookahead])
    out = capsys.readouterr().out
    assert code == 0  # it may be meant: an implementation that observes returns None
    assert (
        f"note: optimizer_step is answered by the first of {clip}, {lookahead} to "
        f"return a value; the others run only when it returns None"
    ) in out.splitlines()
    main(["plugins", "--check", f"{__name__}:ClipStep"])
    assert "note:" not in capsys.readouterr().out
