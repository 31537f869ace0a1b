"""Selecting, loading, ordering and refusing plugins."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import hooktrain
from hooktrain import hookimpl
from hooktrain.errors import PluginError
from hooktrain.testing import run

RECORDING_PLUGIN = """
from hooktrain import hookimpl

class Tagger:
    def __init__(self, tag="default", log=None):
        self.tag = tag
        self.log = log if log is not None else []

    @hookimpl
    def on_fit_start(self, trainer):
        trainer.log("tag_" + self.tag, 1.0)

def factory(**options):
    return Tagger(**options)
"""

MODULE_PLUGIN = """
from hooktrain import hookimpl

seen = []

@hookimpl
def on_train_epoch_end(trainer):
    seen.append(trainer.current_epoch)
"""


def test_entry_point_class_gets_options(fake_dists):
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    result = run([("tagger", {"tag": "hello"})], max_epochs=1, record=False)
    assert "tag_hello" in result.trainer.metrics
    assert result.trainer.plugin_names == ["tagger"]


def test_a_misspelt_option_is_refused_listing_the_options_and_the_closest(fake_dists):
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    with pytest.raises(PluginError) as info:
        hooktrain.Trainer(plugins=[("tagger", {"tags": "hello"})])
    message = str(info.value)
    assert "unexpected keyword argument 'tags'" in message
    assert "Its options: tag, log (did you mean 'tags' -> 'tag'?)" in message


class Strict:
    def __init__(self, every: object = 1) -> None:
        self.every = int(every)  # type: ignore[call-overload]


def test_a_constructor_refusing_an_option_is_named():
    # A bare "ValueError: invalid literal for int()" named no plugin. It stays a
    # ValueError (what the plugin documents), with a note naming the plugin.
    with pytest.raises(ValueError, match="invalid literal for int") as info:
        hooktrain.Trainer(plugins=[(f"{__name__}:Strict", {"every": "often"})])
    assert info.value.__notes__ == [
        f"raised building plugin '{__name__}:Strict' with options {{'every': 'often'}}"
    ]


def test_a_factory_taking_any_option_gets_no_list_of_options(fake_dists):
    # factory(**options) passes them on: only the class it calls knows them.
    fake_dists.add("tagger-dist", {"tagger": "tagmod:factory"}, {"tagmod": RECORDING_PLUGIN})
    with pytest.raises(PluginError, match=r"unexpected keyword argument 'tags'$"):
        hooktrain.Trainer(plugins=[("tagger", {"tags": "hello"})])


def test_entry_point_factory_and_module(fake_dists):
    fake_dists.add(
        "two-dist",
        {"made": "tagmod:factory", "modplug": "modplug"},
        {"tagmod": RECORDING_PLUGIN, "modplug": MODULE_PLUGIN},
    )
    result = run([("made", {"tag": "f"}), "modplug"], max_epochs=2, record=False)
    assert "tag_f" in result.trainer.metrics
    import modplug

    assert modplug.seen == [0, 1]


def test_import_path_and_object_and_class(fake_dists):
    fake_dists.add("unused-dist", {}, {"tagmod": RECORDING_PLUGIN})
    import tagmod

    result = run(
        ["tagmod:Tagger", (tagmod.Tagger, {"tag": "cls"}), tagmod.Tagger(tag="obj")],
        max_epochs=1,
        record=False,
    )
    for tag in ("default", "cls", "obj"):
        assert f"tag_{tag}" in result.trainer.metrics
    assert len(set(result.trainer.plugin_names)) == 3


def test_unknown_name_lists_installed_and_closest(fake_dists):
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=["taggr"])
    message = str(excinfo.value)
    assert "unknown plugin 'taggr'" in message
    assert "Did you mean 'tagger'?" in message
    assert "tagger" in message.split("Installed plugins:")[1]


def test_a_distribution_name_given_as_a_plugin_name_gets_the_plugin_names(fake_dists):
    # The README's table puts "hooktrain-tqdm" beside "tqdm"; difflib found no close name.
    fake_dists.add("hooktrain-tagger", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=["hooktrain_Tagger"])
    message = str(excinfo.value)
    assert "'hooktrain_Tagger' is the distribution; the plugin names it installs: 'tagger'" in (
        message
    )


def test_broken_plugin_breaks_only_runs_that_select_it(fake_dists):
    fake_dists.add(
        "broken-dist",
        {"broken": "brokenmod:Plugin"},
        {"brokenmod": "raise ImportError('needs libfoo 3')\n"},
        version="2.5",
    )
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    # Not selected: never imported, the run works.
    run(["tagger"], max_epochs=1, record=False)
    assert "brokenmod" not in sys.modules
    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=["broken"])
    message = str(excinfo.value)
    assert "'broken'" in message and "broken-dist 2.5" in message and "needs libfoo 3" in message


def test_disable_env_skips_plugin_before_import(fake_dists, monkeypatch, capsys):
    fake_dists.add(
        "broken-dist", {"broken": "brokenmod:Plugin"}, {"brokenmod": "raise ImportError('x')\n"}
    )
    monkeypatch.setenv("HOOKTRAIN_DISABLE_PLUGINS", "broken, other")
    trainer = hooktrain.Trainer(plugins=["broken"])
    assert trainer.plugin_names == []
    assert "brokenmod" not in sys.modules
    assert "disabled by HOOKTRAIN_DISABLE_PLUGINS" in capsys.readouterr().err


def test_a_misspelt_disabled_name_is_reported_with_the_closest(fake_dists, monkeypatch, capsys):
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    monkeypatch.setenv("HOOKTRAIN_DISABLE_PLUGINS", "taggr")
    trainer = hooktrain.Trainer(plugins=["tagger"])
    assert trainer.plugin_names == ["tagger"]  # still runs: nothing was disabled
    err = capsys.readouterr().err
    assert "HOOKTRAIN_DISABLE_PLUGINS disables 'taggr', which is no installed plugin" in err
    assert "did you mean 'tagger'?" in err


def test_typo_in_hook_name_is_refused_with_closest_hook():
    class Typo:
        @hookimpl
        def on_train_epoch_ned(self, trainer):
            pass

    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=[Typo()])
    message = str(excinfo.value)
    assert "'Typo'" in message and "'on_train_epoch_ned'" in message
    assert "did you mean 'on_train_epoch_end'?" in message


@pytest.mark.parametrize(
    ("theirs", "said"),
    [
        ("on_epoch_end", "Lightning's on_epoch_end is on_train_epoch_end here"),
        ("on_train_start", "Lightning's on_train_start is on_fit_start here"),
        ("on_batch_end", "Lightning's on_batch_end is on_train_batch_end here"),
        ("on_epoch_begin", "Keras's on_epoch_begin is on_train_epoch_start here"),
    ],
)
def test_a_hook_name_of_another_trainer_gets_hooktrains_name_for_it(theirs, said):
    # By spelling alone on_epoch_end was sent to on_test_epoch_end, which fit never
    # calls, and on_train_start to on_train_epoch_start, which runs every epoch.
    plugin = type("Migrated", (), {theirs: hookimpl(lambda self, trainer: None)})()
    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=[plugin])
    message = str(excinfo.value)
    assert f"implements {theirs!r}, which is not a hooktrain hook; {said}" in message
    assert "did you mean" not in message


def test_a_method_named_like_a_hook_without_hookimpl_is_warned_about():
    class Forgot:
        name = "forgot"

        def on_train_epoch_end(self, trainer):  # no @hookimpl: pluggy ignores it
            raise AssertionError("never called")

        @hookimpl
        def on_fit_end(self, trainer):
            pass

    with pytest.warns(
        UserWarning, match=r"'forgot' defines on_train_epoch_end\(\) without @hookimpl"
    ) as caught:
        hooktrain.Trainer(plugins=[Forgot()])
    # The warning points at the method the author wrote, not at hooktrain's code.
    (warning,) = [w for w in caught if "without @hookimpl" in str(w.message)]
    assert warning.filename == __file__
    assert warning.lineno == Forgot.on_train_epoch_end.__code__.co_firstlineno


def test_unknown_argument_is_refused():
    class BadArgs:
        @hookimpl
        def on_train_batch_end(self, trainer, loss):
            pass

    with pytest.raises(PluginError, match=r"BadArgs.*loss"):
        hooktrain.Trainer(plugins=[BadArgs()])


class TakesArgs:
    @hookimpl
    def on_train_batch_end(self, trainer, *args):
        pass


class TakesKwargs:
    @hookimpl
    def on_train_batch_end(self, trainer, **kwargs):
        pass


@pytest.mark.parametrize(("plugin", "star"), [(TakesArgs, "*args"), (TakesKwargs, "**kwargs")])
def test_star_arguments_are_refused_since_no_hook_fills_them(plugin, star):
    # pluggy passes the arguments an implementation names: these stayed () and {}.
    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=[plugin()])
    message = str(excinfo.value)
    name = plugin.__name__
    assert f"{name!r}: its on_train_batch_end takes {star}, which a hook never fills" in message
    assert "offers (trainer, outputs, batch, batch_idx)" in message


def test_an_argument_with_a_default_is_refused_since_no_hook_would_pass_it():
    class LightningStyle:
        @hookimpl
        def on_validation_batch_end(self, trainer, batch_idx, dataloader_idx=0):
            pass

    with pytest.raises(PluginError) as excinfo:
        hooktrain.Trainer(plugins=[LightningStyle()])
    message = str(excinfo.value)
    assert "'LightningStyle'" in message and "gives dataloader_idx a default value" in message
    assert "Remove the default" in message and "dataloader_idx)" in message

    class Misspelt:
        @hookimpl
        def on_train_batch_end(self, trainer, batch_index=-1):
            pass

    with pytest.raises(PluginError, match=r"'Misspelt'.*gives batch_index a default value"):
        hooktrain.Trainer(plugins=[Misspelt()])


def test_options_for_a_plain_object_are_refused():
    with pytest.raises(PluginError, match="takes no options"):
        hooktrain.Trainer(plugins=[(types.ModuleType("plain"), {"x": 1})])


def test_malformed_entries_are_refused():
    with pytest.raises(PluginError, match="pair"):
        hooktrain.Trainer(plugins=[("tqdm", {"a": 1}, "extra")])
    with pytest.raises(hooktrain.ConfigurationError, match="must be a list"):
        hooktrain.Trainer(plugins="tqdm")


def test_empty_list_is_the_bare_core():
    trainer = hooktrain.Trainer(plugins=[])
    assert trainer.plugin_names == []
    assert [name for name, _ in trainer.plugin_manager.list_name_plugin()] == ["core"]


def test_default_set_selects_installed_defaults_only(monkeypatch):
    from hooktrain import plugins as plugins_module

    monkeypatch.setattr(plugins_module, "DEFAULT_PLUGINS", ("surely-not-installed",))
    assert hooktrain.Trainer(plugins=None).plugin_names == []


# ---------------------------------------------------------------------- order


def _order_plugin(name, log, **marks):
    class Plugin:
        @hookimpl(**marks)
        def on_train_epoch_start(self):
            log.append(name)

    plugin = Plugin()
    plugin.name = name
    return plugin


def test_implementations_run_in_list_order():
    log = []
    run(
        [_order_plugin("a", log), _order_plugin("b", log), _order_plugin("c", log)],
        max_epochs=1,
        record=False,
    )
    assert log == ["a", "b", "c"]


def test_tryfirst_and_trylast_override_list_order():
    log = []
    run(
        [
            _order_plugin("a", log, trylast=True),
            _order_plugin("b", log),
            _order_plugin("c", log, tryfirst=True),
        ],
        max_epochs=1,
        record=False,
    )
    assert log == ["c", "b", "a"]


def test_trylast_implementations_run_before_the_core_in_reverse_list_order():
    # pluggy puts each trylast implementation in front of those registered before
    # it; the core registers last, so its default answers after every plugin's.
    log = []

    def trylast_step(name):
        class Plugin:
            @hookimpl(trylast=True)
            def optimizer_step(self, optimizer):
                log.append(name)
                if name == "answers":
                    optimizer.step()
                    return True
                return None

        plugin = Plugin()
        plugin.name = name
        return plugin

    result = run([trylast_step("answers"), trylast_step("observes")], max_epochs=1, record=False)
    steps = result.trainer.global_step
    assert steps > 0
    assert log == ["observes", "answers"] * steps


def test_wrappers_surround_and_core_default_runs_last():
    log = []

    class Wrapper:
        name = "wrapper"

        @hookimpl(wrapper=True)
        def optimizer_step(self, optimizer):
            log.append("before")
            result = yield
            log.append(f"after:{result}")
            return result

    class Observer:
        name = "observer"

        @hookimpl
        def optimizer_step(self, optimizer):
            log.append("observer")  # returns None: the core's default still steps

    result = run([Observer(), Wrapper()], max_epochs=1, limit_train_batches=1, record=False)
    assert log == ["before", "observer", "after:True"]
    assert result.trainer.global_step == 1


def test_a_plugin_replaces_a_compute_hook_by_returning_a_value():
    class NoStep:
        @hookimpl
        def optimizer_step(self, optimizer):
            return False  # claims the step and reports it skipped

    result = run([NoStep()], max_epochs=1, limit_train_batches=2, record=False)
    assert result.trainer.last_step_skipped is True
    before = hooktrain.testing.make_model()
    for a, b in zip(before.parameters(), result.model.parameters(), strict=True):
        assert a.equal(b)  # the core's optimizer.step() never ran


def test_unimplemented_hooks_are_not_called_at_all():
    from hooktrain.hookcalls import ResolvedHooks as _ResolvedHooks

    trainer = hooktrain.Trainer(plugins=[])
    resolved = _ResolvedHooks(trainer.plugin_manager, trainer._defaults)
    assert resolved.on_train_batch_start is None
    assert resolved.on_before_backward is None
    # Only the core implements it: called directly, without pluggy.
    assert resolved.optimizer_step.__self__ is trainer._defaults


def test_plugins_command_shows_call_order(fake_dists):
    fake_dists.add("tagger-dist", {"tagger": "tagmod:Tagger"}, {"tagmod": RECORDING_PLUGIN})
    out = subprocess.run(
        [sys.executable, "-m", "hooktrain", "plugins", "tagger"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("on_fit_start"))
    assert "tagger" in line
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("optimizer_step"))
    assert "core (default)" in line


def test_a_compute_hook_returning_another_value_than_its_spec_allows_is_refused():
    # ``return loss`` from backward would end the hook: the core's loss.backward()
    # never ran and the weights never moved, while the loss was still reported.
    class ReturnsTheLoss:
        name = "returns_the_loss"

        @hookimpl
        def backward(self, loss):
            return loss

    with pytest.raises(PluginError) as excinfo:
        run([ReturnsTheLoss()], max_epochs=1, limit_train_batches=2, record=False)
    message = str(excinfo.value)
    assert "the backward hook returned Tensor" in message and "which is not True" in message
    assert "implemented by 'returns_the_loss'" in message

    class ReturnsANumber:
        name = "returns_a_number"

        @hookimpl
        def optimizer_step(self, optimizer):
            optimizer.step()
            return 1

    with pytest.raises(PluginError, match=r"optimizer_step hook returned int 1, which is not True"):
        run([ReturnsANumber()], max_epochs=1, limit_train_batches=2, record=False)


class ReturnsNonsense:
    """Returns ``value`` from whichever compute hook it is given."""

    name = "returns_nonsense"

    def __init__(self, hook: str, value: object = "nonsense") -> None:
        setattr(self, hook, hookimpl(specname=hook)(lambda: value))


@pytest.mark.parametrize(
    ("hook", "value", "expected"),
    [
        ("compute_metrics", "nonsense", "a dict of numbers or 0-dim tensors"),
        ("batch_iterator", 7, "an iterable"),
        ("gather_for_metrics", "nonsense", r"\(outputs, targets\)"),
        ("clip_gradients", "nonsense", "the norm or None"),
        # True, as backward and optimizer_step return it, was logged as a norm of 1.0.
        ("clip_gradients", True, "the norm or None"),
    ],
)
def test_a_result_the_loop_cannot_use_names_the_plugin(hook, value, expected):
    # Each failed later, elsewhere: "'str' object has no attribute 'items'", "'int'
    # object is not iterable", "too many values to unpack", an error about
    # trainer.log('grad_norm'), none of them naming the plugin.
    returned = f"{type(value).__name__} {value!r}"
    message = rf"the {hook} hook returned {returned}, which is not {expected}; implemented by "
    with pytest.raises(PluginError, match=message + "'returns_nonsense'"):
        run(
            [ReturnsNonsense(hook, value)],
            max_epochs=1,
            limit_train_batches=2,
            record=False,
            gradient_clip_val=1.0,
        )


class LoadsTheModelAndReturnsOn:
    """Loads the model itself and returns what ``load_state_dict`` returned."""

    name = "loads_the_model"

    @hookimpl
    def set_state_dict(self, trainer, model_state_dict):
        return trainer.module.load_state_dict(model_state_dict)


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        # Its result ended the hook before the core's default: the resumed run's
        # optimizer silently started afresh (no momentum).
        (LoadsTheModelAndReturnsOn(), "set_state_dict hook returned _IncompatibleKeys"),
        # "'list' object has no attribute 'get'", "KeyError: 'model'", naming no one.
        (ReturnsNonsense("load_checkpoint", [1, 2]), "load_checkpoint hook returned list"),
        (ReturnsNonsense("load_checkpoint", {"0.weight": 1}), "load_checkpoint hook returned dict"),
    ],
)
def test_a_resume_hook_result_the_core_cannot_use_names_the_plugin(tmp_path, plugin, expected):
    path = tmp_path / "run.ckpt"
    import torch

    torch.save(run([], max_epochs=1, record=False).trainer.dump_checkpoint(), path)
    with pytest.raises(PluginError, match=expected) as excinfo:
        run([plugin], max_epochs=2, record=False, fit_kwargs={"ckpt_path": str(path)})
    assert f"implemented by {plugin.name!r}" in str(excinfo.value)


def test_an_all_reduce_that_returns_no_tensor_names_the_plugin():
    import torch

    trainer = hooktrain.Trainer(plugins=[ReturnsNonsense("all_reduce")], device="cpu")
    trainer.world_size = 2  # as a distributed plugin sets it
    with pytest.raises(
        PluginError, match="all_reduce hook returned str 'nonsense', which is not a tensor"
    ):
        trainer.all_reduce(torch.ones(()))


def test_a_batch_a_plugin_moved_into_a_shape_the_core_cannot_unpack_names_the_plugin():
    # It read "define training_step on the model", blaming the model for the
    # plugin's batch.
    with pytest.raises(
        hooktrain.ConfigurationError,
        match=r"cannot unpack the batch .*got a str.*\(transfer_batch_to_device is "
        r"implemented by 'returns_nonsense'",
    ):
        run(
            [ReturnsNonsense("transfer_batch_to_device")],
            max_epochs=1,
            limit_train_batches=2,
            record=False,
        )


def test_a_forward_step_of_a_plugin_is_named_when_its_result_holds_no_loss():
    with pytest.raises(
        hooktrain.ConfigurationError,
        match=r"got str \(forward_step is implemented "
        r"by 'returns_nonsense'",
    ):
        run([ReturnsNonsense("forward_step")], max_epochs=1, limit_train_batches=2, record=False)


class SwallowsTheResult:
    """Wrappers that forget ``return (yield)``: the hook's result becomes None."""

    name = "swallows"

    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl(wrapper=True)
    def optimizer_step(self, optimizer):
        result = yield
        return result if self.hook != "optimizer_step" else None

    @hookimpl(wrapper=True)
    def forward_step(self, batch):
        result = yield
        return result if self.hook != "forward_step" else None


def test_a_wrapper_that_drops_the_result_is_named():
    # It read "implemented by no plugin", with advice for observers, not wrappers.
    with pytest.raises(
        PluginError,
        match=r"optimizer_step hook returned NoneType None, which is not True or False; "
        r"implemented by the core alone, wrapped by 'swallows' \(.*`return \(yield\)`",
    ):
        run([SwallowsTheResult("optimizer_step")], limit_train_batches=2, record=False)
    with pytest.raises(
        hooktrain.ConfigurationError, match=r"got NoneType \(forward_step is wrapped by 'swallows'"
    ):
        run([SwallowsTheResult("forward_step")], limit_train_batches=2, record=False)


def test_a_forward_step_of_a_plugin_is_named_when_its_loss_is_not_a_scalar():
    import torch

    logits = torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(
        hooktrain.ConfigurationError,
        match=r"got shape \(4, 2\).*\(forward_step is implemented by 'returns_nonsense'",
    ):
        run(
            [ReturnsNonsense("forward_step", logits)],
            max_epochs=1,
            limit_train_batches=2,
            record=False,
        )


def test_a_metric_function_returning_no_number_is_named():
    with pytest.raises(hooktrain.ConfigurationError, match="metric 'acc' returned str 'high'"):
        run(
            [],
            max_epochs=1,
            limit_train_batches=2,
            record=False,
            fit_kwargs={"metrics": {"acc": lambda outputs, targets: "high"}},
        )


def test_an_implementation_marked_both_tryfirst_and_trylast_is_refused():
    class Torn:
        name = "torn"

        @hookimpl(tryfirst=True, trylast=True)
        def on_train_batch_end(self, trainer):
            pass

    with pytest.raises(PluginError, match=r"'torn': its on_train_batch_end is marked both"):
        hooktrain.Trainer(plugins=[Torn()])

    class Either:
        name = "either"

        @hookimpl(tryfirst=True)
        def on_train_batch_end(self, trainer):
            pass

    hooktrain.Trainer(plugins=[Either()])


def test_a_hook_that_yields_without_wrapper_true_is_refused():
    class Timer:
        name = "timer"

        @hookimpl
        def forward_step(self, trainer):
            yield  # meant as a wrapper: as a plain implementation it never runs

    with pytest.raises(PluginError, match=r"'timer': its forward_step yields, but is not marked"):
        hooktrain.Trainer(plugins=[Timer()])

    class Noisy:
        name = "noisy"

        def __init__(self) -> None:
            self.drawn = 0

        @hookimpl
        def batch_iterator(self, dataloader):
            # The generator is the answer: its body runs as the loop draws batches.
            for batch in dataloader:
                self.drawn += 1
                yield batch

    noisy = Noisy()
    result = run([noisy], max_epochs=1, record=False)
    assert noisy.drawn >= result.trainer.global_step > 0


def test_a_taken_name_or_an_object_registered_twice_is_refused_clearly():
    class Core:
        name = "core"

        @hookimpl
        def on_fit_end(self):
            pass

    with pytest.raises(PluginError, match=r"'core' is the name of hooktrain's own hook impl"):
        hooktrain.Trainer(plugins=[Core()])
    with pytest.raises(
        PluginError,
        match=r"'core' cannot be registered: the name is taken by "
        r"hooktrain's own hook implementations; give the plugin another name",
    ):
        hooktrain.Trainer(plugins=[]).plugin_manager.register(Core())

    twice = Core()
    twice.name = "twice"
    # Registered in reverse, the copy listed second was named 'twice-2' and the
    # error said the first was registered already, as 'twice-2'.
    with pytest.raises(PluginError, match=r"^the same Core object is listed twice in the plugins"):
        hooktrain.Trainer(plugins=[twice, twice])

    trainer = hooktrain.Trainer(plugins=[])
    once = Core()
    trainer.plugin_manager.register(once, "watcher")
    with pytest.raises(PluginError, match=r"'again' is registered already, as 'watcher'"):
        trainer.plugin_manager.register(once, "again")
    with pytest.raises(
        PluginError,
        match=r"'watcher' cannot be registered: the name is taken "
        r"by another plugin \(Core\)",
    ):
        trainer.plugin_manager.register(Core(), "watcher")


def test_one_plugin_selected_twice_is_registered_under_numbered_names():
    calls = []

    class Watcher:
        name = "watcher"

        def __init__(self, tag):
            self.tag = tag

        @hookimpl
        def on_fit_end(self):
            calls.append(self.tag)

    result = run([Watcher("a"), Watcher("b")], max_epochs=1, limit_train_batches=1, record=False)
    assert result.trainer.plugin_names == ["watcher", "watcher-2"]
    assert calls == ["a", "b"]
    assert result.trainer.plugin_manager.get_plugin("watcher-2").tag == "b"


def test_a_name_two_distributions_claim_is_noted_and_warned_about(tmp_path, monkeypatch, capsys):
    # A second, real distribution (its metadata on sys.path) claiming 'profile', an
    # entry point of hooktrain itself, found after it.
    info = tmp_path / "other_profiler-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-profiler\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[hooktrain]\nprofile = other_profiler:Plugin\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    from hooktrain.plugins import installed_plugins

    profile = installed_plugins()["profile"]
    assert profile.distribution == "hooktrain"
    assert profile.shadowed == ("other-profiler 2.0",)
    with pytest.warns(
        UserWarning,
        match=r"'profile' is provided by hooktrain .*, which is "
        r"used, and also by other-profiler 2\.0, ignored",
    ) as caught:
        trainer = hooktrain.Trainer(plugins=["profile"])  # the warning points here
    (warning,) = [w for w in caught if "other-profiler" in str(w.message)]
    assert warning.filename == __file__
    assert "the warning points here" in Path(__file__).read_text().splitlines()[warning.lineno - 1]
    assert type(trainer.plugin_manager.get_plugin("profile")).__module__ == "hooktrain.profiling"

    from hooktrain.cli import main

    main(["plugins"])
    out = capsys.readouterr().out
    assert "note: 'profile' is also provided by other-profiler 2.0, which is ignored" in out
