"""Every error the core raises on purpose, and what happens around an exception."""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hooktrain
from hooktrain import hookimpl
from hooktrain.errors import (
    ConfigurationError,
    HookError,
    NonFiniteLossError,
    missing_monitor_hint,
)
from hooktrain.testing import HookRecorder, make_data, make_model, run


def fit(model=None, loader=None, trainer=None, **kwargs):
    trainer = trainer or hooktrain.Trainer(plugins=[], device="cpu")
    model = model if model is not None else make_model()
    loader = loader if loader is not None else make_data()[0]
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
    trainer.fit(model, loader, **kwargs)
    return trainer


class Exploding:
    name = "exploder"

    def __init__(self, at_step: int = 3) -> None:
        self.at_step = at_step

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step == self.at_step:
            raise ValueError("boom")


class Witness:
    name = "witness"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.exception: BaseException | None = None

    @hookimpl
    def on_exception(self, trainer, exception):
        self.events.append("on_exception")
        self.exception = exception

    @hookimpl
    def teardown(self, trainer, stage):
        self.events.append("teardown")


def test_hook_error_names_plugin_hook_epoch_and_step():
    witness = Witness()
    with pytest.raises(HookError) as excinfo:
        run([Exploding(at_step=10), witness], max_epochs=3, record=False)
    error = excinfo.value
    assert error.plugin == "exploder" and error.hook == "on_train_batch_end"
    message = str(error)
    assert "'exploder'" in message and "'on_train_batch_end'" in message
    assert "epoch 1" in message and "global step 10" in message and "boom" in message
    assert isinstance(error.__cause__, ValueError)
    assert witness.events == ["on_exception", "teardown"]
    assert witness.exception is error


class BadWrapper:
    name = "bad_wrapper"

    def __init__(self, yields: int) -> None:
        self.yields = yields

    @hookimpl(wrapper=True)
    def on_train_epoch_start(self):
        for _ in range(self.yields):
            yield


class GoodWrapper:
    name = "good_wrapper"

    @hookimpl(wrapper=True)
    def on_train_epoch_start(self):
        return (yield)


@pytest.mark.parametrize("good_first", [True, False])
@pytest.mark.parametrize("yields", [0, 2])
def test_a_wrapper_that_yields_never_or_twice_is_named(yields, good_first):
    # pluggy raises a bare RuntimeError that names the generator's code, not the
    # plugin: a user with several plugins installed could not tell whose it was. A
    # correct wrapper around it re-raises it from its own frame, and was blamed.
    witness = Witness()
    wrappers = [GoodWrapper(), BadWrapper(yields)]
    with pytest.raises(HookError, match="yield") as excinfo:
        run([*(wrappers if good_first else wrappers[::-1]), witness], max_epochs=1, record=False)
    assert (excinfo.value.plugin, excinfo.value.hook) == ("bad_wrapper", "on_train_epoch_start")
    assert witness.events == ["on_exception", "teardown"]


def test_lightnings_self_log_in_a_step_points_to_trainer_log():
    # A step moved over from Lightning as it was failed with a bare AttributeError.
    class Ported(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(AttributeError, match="'Ported' object has no attribute 'log'") as info:
        fit(Ported(), trainer=trainer)
    assert any("log with trainer.log(name, value)" in note for note in info.value.__notes__)

    class PortedDict(Ported):
        def validation_step(self, batch, batch_idx):
            self.log_dict({"val_acc": 1.0})

    with pytest.raises(AttributeError, match="'log_dict'") as info:
        hooktrain.Trainer(plugins=[], device="cpu").validate(PortedDict(), make_data()[1])
    assert any("has no self.log_dict; log with" in note for note in info.value.__notes__)

    # Any other missing attribute gets no such advice.
    class Misspelt(Ported):
        def training_step(self, batch, batch_idx):
            return self.layr(batch[0]).sum()

    with pytest.raises(AttributeError, match="'layr'") as info:
        fit(Misspelt(), trainer=trainer)
    assert not any("trainer.log" in note for note in info.value.__notes__)


def test_a_models_steps_get_the_arguments_they_take_and_one_taking_none_is_refused():
    # Lightning passes batch_idx only to a step that takes it; hooktrain's bare
    # "takes 2 positional arguments but 3 were given" named neither cause nor fix.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

    class BatchOnly(Net):
        def training_step(self, batch):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

    with_index, batch_only = Net(), BatchOnly()
    fit(with_index, trainer=hooktrain.Trainer(plugins=[], device="cpu", seed=0))
    fit(batch_only, trainer=hooktrain.Trainer(plugins=[], device="cpu", seed=0))
    assert torch.equal(with_index.layer.weight, batch_only.layer.weight)

    def logs_its_arguments(step):
        # A decorator's (*args, **kwargs) wrapper: the parameters are read through it.
        @functools.wraps(step)
        def wrapper(*args, **kwargs):
            seen.append((len(args), tuple(sorted(kwargs))))
            return step(*args, **kwargs)

        return wrapper

    seen: list = []

    class Wrapped(Net):
        @logs_its_arguments
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

    hooktrain.Trainer(plugins=[], device="cpu").validate(Wrapped(), make_data()[1])
    assert seen and set(seen) == {(3, ("dataloader_idx",))}  # self, batch, batch_idx

    class NeedsMore(Net):
        def validation_step(self, batch, batch_idx, extra):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

    trainer = hooktrain.Trainer(plugins=[], device="cpu", max_epochs=3)
    with pytest.raises(
        ConfigurationError,
        match=r"the model's validation_step\(batch, batch_idx, extra\) can be called neither "
        r"as validation_step\(batch, batch_idx\) nor as validation_step\(batch\)",
    ):
        fit(NeedsMore(), trainer=trainer, val_dataloaders=make_data()[1])
    assert trainer.global_step == 0  # before training, not at the first validation


class Faulty(nn.Module):
    """A model whose forward always raises: the user's own error."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 2)

    def forward(self, x):
        raise RuntimeError("shape trouble in my model")


def test_error_in_user_code_keeps_its_type_and_gains_a_note():
    witness = Witness()
    trainer = hooktrain.Trainer(plugins=[witness], device="cpu")
    with pytest.raises(RuntimeError, match="shape trouble") as excinfo:
        fit(Faulty(), trainer=trainer)
    assert any("epoch 0, global step 0" in note for note in excinfo.value.__notes__)
    assert witness.events == ["on_exception", "teardown"]


def test_a_plugin_whose_call_into_the_core_fails_is_named_and_a_wrapper_is_not():
    class Restorer:
        """Calls the core (which runs the core's own state hooks) from its prepare."""

        def __init__(self, checkpoint):
            self.checkpoint = checkpoint

        @hookimpl
        def prepare(self, trainer, stage):
            trainer.restore_checkpoint(self.checkpoint)

    donor = fit(make_model(), trainer=hooktrain.Trainer(plugins=[], device="cpu", max_steps=1))
    checkpoint = donor.dump_checkpoint()
    checkpoint["optimizers"] = checkpoint["optimizers"] * 2
    with pytest.raises(HookError, match="holds 2 optimizer") as info:
        fit(make_model(), trainer=hooktrain.Trainer(plugins=[Restorer(checkpoint)], device="cpu"))
    assert (info.value.plugin, info.value.hook) == ("Restorer", "prepare")

    class AroundForward:
        @hookimpl(wrapper=True)
        def forward_step(self, trainer, batch, batch_idx, stage):
            return (yield)

    # The model's error, raised inside the core's forward_step that the wrapper
    # surrounds, stays the model's.
    with pytest.raises(RuntimeError, match="shape trouble"):
        fit(Faulty(), trainer=hooktrain.Trainer(plugins=[AroundForward()], device="cpu"))

    class ValidatesItself:
        """Calls the core, which runs the model's own code, from a plain hook."""

        @hookimpl
        def on_train_epoch_end(self, trainer):
            batch = next(iter(make_data()[1]))
            trainer.plugin_manager.hook.forward_step(
                trainer=trainer, batch=batch, batch_idx=0, stage="validate"
            )

    class FaultyValidation(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def forward(self, x):
            return self.layer(x)

        def validation_step(self, batch, batch_idx):
            raise RuntimeError("my validation_step is wrong")

    with pytest.raises(RuntimeError, match="my validation_step is wrong"):
        trainer = hooktrain.Trainer(plugins=[ValidatesItself()], device="cpu")
        fit(FaultyValidation(), trainer=trainer)

    class WrapsForward:
        """A closure put around the model's forward in prepare runs the model's code."""

        @hookimpl
        def prepare(self, trainer):
            inner = trainer.model.forward

            def forward(x):
                return inner(x)

            trainer.model.forward = forward

    with pytest.raises(RuntimeError, match="shape trouble"):
        fit(Faulty(), trainer=hooktrain.Trainer(plugins=[WrapsForward()], device="cpu"))


def test_an_error_in_the_iterator_a_batch_iterator_returned_names_the_plugin():
    class Shards:
        name = "shards"

        @hookimpl
        def batch_iterator(self, dataloader):
            def read():
                for index, batch in enumerate(dataloader):
                    if index == 3:
                        raise OSError("shard 3 is corrupt")
                    yield batch

            return read()  # not a generator function itself: its body ran and returned

    with pytest.raises(HookError, match="shard 3 is corrupt") as info:
        fit(trainer=hooktrain.Trainer(plugins=[Shards()], device="cpu"))
    assert (info.value.plugin, info.value.hook) == ("shards", "batch_iterator")


def test_a_stage_started_from_a_hook_of_a_running_one_is_refused_and_leaves_it_whole():
    # A plugin's trainer.validate() in on_train_epoch_end took over the fit: its
    # stage stayed "validate" (early stopping, which judges in fit only, never
    # stopped), and its setup replaced the fit's model, loss and stop flag.
    class ValidatesOther:
        name = "validates-other"

        @hookimpl
        def on_train_epoch_end(self, trainer):
            trainer.validate(trainer.model, make_data()[1])

    witness = Witness()
    trainer = hooktrain.Trainer(plugins=[ValidatesOther(), witness], device="cpu")
    with pytest.raises(HookError, match="one stage at a time") as info:
        fit(trainer=trainer)
    assert (info.value.plugin, info.value.hook) == ("validates-other", "on_train_epoch_end")
    message = str(info.value)
    assert "validate() was called while this trainer's fit() runs" in message
    assert "fit(model, train, [val, other])" in message
    assert isinstance(info.value.__cause__, ConfigurationError)
    assert trainer.stage == "fit"
    assert witness.events == ["on_exception", "teardown"]
    # The fit that failed leaves the trainer free for the next stage.
    assert "val_loss" in trainer.validate(trainer.model, make_data()[1])


def test_a_ctrl_c_in_teardown_leaves_the_trainer_free_for_the_next_stage():
    class InterruptedTeardown:
        @hookimpl
        def teardown(self, trainer):
            if trainer.stage == "fit":
                raise KeyboardInterrupt

    trainer = hooktrain.Trainer(plugins=[InterruptedTeardown()], device="cpu")
    with pytest.raises(KeyboardInterrupt):
        fit(trainer=trainer)
    assert "val_loss" in trainer.validate(make_model(), make_data()[1], loss_fn=F.cross_entropy)


def test_keyboard_interrupt_runs_on_exception_and_teardown():
    class CtrlC:
        @hookimpl
        def on_train_batch_end(self, trainer):
            if trainer.global_step == 2:
                # A real SIGINT delivered to this process, as Ctrl-C would.
                os.kill(os.getpid(), signal.SIGINT)

    assert threading.current_thread() is threading.main_thread()
    witness = Witness()
    # A shell that starts a job in the background has it ignore SIGINT, and Python then
    # leaves SIGINT ignored: install Python's own Ctrl-C handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run([CtrlC(), witness], max_epochs=2, record=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert witness.events == ["on_exception", "teardown"]
    assert isinstance(witness.exception, KeyboardInterrupt)


class BadCleaner:
    """Raises in both clean-up hooks."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def on_exception(self):
        raise RuntimeError(f"{self.name}'s handler broke")

    @hookimpl
    def teardown(self):
        raise OSError(f"{self.name} could not close its file")


@pytest.mark.parametrize("witness_first", [True, False])
def test_every_plugin_cleans_up_when_others_fail_to(capsys, witness_first):
    # pluggy stops a hook call at the first implementation that raises: whichever
    # plugins came after a failing one never flushed their logs. Both orders, as
    # the list's order decides which plugins pluggy calls first.
    witness = Witness()
    cleaners = [BadCleaner("one"), BadCleaner("two")]
    plugins = [witness, *cleaners] if witness_first else [*cleaners, witness]
    with pytest.raises(HookError) as excinfo:
        run([Exploding(), *plugins], max_epochs=1, record=False)
    assert excinfo.value.plugin == "exploder"  # the first error, not a clean-up's
    assert witness.events == ["on_exception", "teardown"]
    err = capsys.readouterr().err
    for name in ("one", "two"):
        assert (
            f"on_exception raised after an error: plugin {name!r} raised in hook "
            f"'on_exception'" in err
        )
        assert f"teardown raised after an error: plugin {name!r} raised in hook 'teardown'" in err


class Exits:
    """Ends the process from a clean-up hook, as a plugin that thinks it is the
    last one to run might."""

    name = "exits"

    @hookimpl(tryfirst=True)
    def on_exception(self):
        raise SystemExit(3)


def test_a_plugin_exiting_in_on_exception_hides_neither_the_error_nor_the_clean_up(capsys):
    # sys.exit there replaced the plugin error being handled: the process ended
    # with status 3 and no message, and the plugins after it never cleaned up.
    witness = Witness()
    with pytest.raises(HookError) as excinfo:
        run([Exploding(), Exits(), witness], max_epochs=1, record=False)
    assert excinfo.value.plugin == "exploder"
    assert witness.events == ["on_exception", "teardown"]
    err = capsys.readouterr().err
    assert (
        "on_exception raised after an error: plugin 'exits' raised in hook 'on_exception' "
        "during fit at epoch 0, global step 3: SystemExit: 3" in err
    )


class ExitsInTeardown:
    name = "exits_in_teardown"

    @hookimpl(tryfirst=True)
    def teardown(self):
        raise SystemExit(5)


def test_a_plugin_exiting_in_teardown_after_a_good_fit_exits_once_the_others_cleaned_up():
    # Its exit is what it asked for, with nothing else to report; the plugins after
    # it used to be skipped.
    witness = Witness()
    with pytest.raises(SystemExit) as excinfo:
        run([ExitsInTeardown(), witness], max_epochs=1, record=False)
    assert excinfo.value.code == 5
    assert witness.events == ["teardown"]


class WrapsTeardown:
    name = "wraps_teardown"
    calls = 0

    @hookimpl(wrapper=True)
    def teardown(self):
        try:
            return (yield)
        finally:
            self.calls += 1


def test_a_teardown_wrapper_runs_once_when_a_plain_teardown_fails():
    # A wrapper (the checkpoint plugin's waits for its last write) ran around the
    # first call already; the implementations left are called without it.
    witness, wrapper = Witness(), WrapsTeardown()
    for plugins in ([BadCleaner("one"), witness, wrapper], [wrapper, witness, BadCleaner("one")]):
        wrapper.calls, witness.events = 0, []
        with pytest.raises(HookError, match="'one' raised in hook 'teardown'"):
            run(plugins, max_epochs=1, record=False)
        assert (wrapper.calls, witness.events) == (1, ["teardown"])


def failing_cleanup_wrapper(when: str, tryfirst: bool) -> object:
    """A plugin wrapping both clean-up hooks that raises before its ``yield`` (a
    connection that is gone) or after it."""

    def wrap():
        if when == "before":
            raise ConnectionError("the tracking server is gone")
        yield
        raise ConnectionError("the tracking server is gone")

    class FailingWrapper:
        name = "failing_wrapper"

        @hookimpl(wrapper=True, tryfirst=tryfirst)
        def on_exception(self):
            return (yield from wrap())

        @hookimpl(wrapper=True, tryfirst=tryfirst)
        def teardown(self):
            return (yield from wrap())

    return FailingWrapper()


@pytest.mark.parametrize("tryfirst", [True, False])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_clean_up_wrapper_failing_keeps_no_plain_clean_up_from_running(capsys, when, tryfirst):
    # A wrapper raising before its yield stopped pluggy's call before any plain
    # implementation, and none was called afterwards: loggers lost their rows and
    # the checkpoint plugin kept its directory lock and SIGTERM handler.
    witness = Witness()
    with pytest.raises(HookError) as excinfo:
        run([Exploding(), failing_cleanup_wrapper(when, tryfirst), witness], record=False)
    assert excinfo.value.plugin == "exploder"
    assert witness.events == ["on_exception", "teardown"]  # once each, either way
    err = capsys.readouterr().err
    for hook in ("on_exception", "teardown"):
        assert f"{hook} raised after an error: plugin 'failing_wrapper' raised in hook" in err


class CountsTeardowns:
    """A plain teardown that counts its calls in ``counts`` and may raise."""

    def __init__(self, name: str, counts: dict, raises=None) -> None:
        self.name, self.counts, self.raises = name, counts, raises

    @hookimpl
    def teardown(self):
        self.count()

    def count(self):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        if self.raises is not None:
            raise self.raises


class CountsTeardownsFirst(CountsTeardowns):
    @hookimpl(tryfirst=True)
    def teardown(self):
        self.count()


class ConvertsTeardownErrors:
    name = "converts"

    @hookimpl(wrapper=True)
    def teardown(self):
        try:
            return (yield)
        except Exception as exc:
            raise RuntimeError("teardown failed") from exc


@pytest.mark.parametrize(
    ("kind", "raises"),
    [
        (CountsTeardownsFirst, OSError("disk full")),
        (CountsTeardownsFirst, hooktrain.PluginError("bad state")),
        (CountsTeardowns, OSError("disk full")),
    ],
    ids=["tryfirst", "tryfirst-plugin-error", "plain"],
)
def test_every_plain_teardown_runs_once_whatever_a_wrapper_makes_of_an_error(kind, raises):
    # A first fix ran the tryfirst ones again when a wrapper converted the error;
    # before it, the ones after the failing one never ran when a wrapper did so.
    counts: dict[str, int] = {}
    plugins = [
        CountsTeardownsFirst("first", counts),
        kind("failing", counts, raises),
        ConvertsTeardownErrors(),
        CountsTeardowns("plain", counts),
        CountsTeardowns("also_plain", counts),
    ]
    with pytest.raises(HookError):
        run([Exploding(), *plugins], max_epochs=1, record=False)
    assert counts == {"first": 1, "failing": 1, "plain": 1, "also_plain": 1}


@pytest.mark.parametrize("witness_first", [True, False])
def test_a_failing_teardown_is_raised_after_every_teardown_ran(witness_first):
    witness = Witness()
    plugins = [witness, BadCleaner("one")] if witness_first else [BadCleaner("one"), witness]
    with pytest.raises(HookError) as excinfo:
        run(plugins, max_epochs=1, record=False)
    assert (excinfo.value.plugin, excinfo.value.hook) == ("one", "teardown")
    assert isinstance(excinfo.value.__cause__, OSError)
    assert witness.events == ["teardown"]


def test_empty_dataloader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ConfigurationError, match=r"^train_dataloaders is empty"):
        fit(loader=empty)
    # Of several loaders, the empty one is named by its index, as its metrics are.
    val = make_data()[1]
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=r"^dataloaders\[1\] is empty"):
        trainer.validate(make_model(), [val, empty, val], loss_fn=F.cross_entropy)
    with pytest.raises(ConfigurationError, match=r"^val_dataloaders is empty"):
        fit(trainer=trainer, val_dataloaders=empty)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
@pytest.mark.parametrize("loaders", [None, [], ()])
def test_an_evaluation_without_dataloaders_asks_for_one(stage, loaders):
    # An empty list was taken for one loader and blamed as an empty dataset.
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=rf"^{stage}\(\) needs at least one dataloader$"):
        getattr(trainer, stage)(make_model(), loaders)


def test_unsized_iterable_that_yields_nothing():
    class Nothing(IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ConfigurationError, match="yielded no batches"):
        fit(loader=DataLoader(Nothing(), batch_size=4))


class Starves:
    """A batch-moving plugin with a bug: its iterator yields nothing."""

    name = "starves"

    @hookimpl
    def batch_iterator(self, dataloader):
        return iter(())


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_plugin_iterator_yielding_nothing_is_not_blamed_on_the_data(stage):
    # The error said only that "the dataloader yielded no batches": the user's data
    # was blamed for what the plugin's batch_iterator did.
    trainer = hooktrain.Trainer(plugins=[Starves()], device="cpu")
    with pytest.raises(ConfigurationError) as excinfo:
        if stage == "fit":
            fit(trainer=trainer)
        else:
            trainer.validate(make_model(), make_data()[1], loss_fn=F.cross_entropy)
    assert "yielded no batches" in str(excinfo.value)
    assert (
        "(batch_iterator is implemented by 'starves': the value may be theirs rather "
        "than the dataloader's)" in str(excinfo.value)
    )


def test_loss_that_is_not_a_scalar():
    with pytest.raises(ConfigurationError, match=r"scalar .* shape \(16,\)"):
        fit(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_a_loss_that_is_not_a_tensor_names_loss_fn_and_a_dict_without_loss_its_keys():
    # Both said "the training step must return the loss tensor or a dict holding
    # 'loss', got dict": a user of loss_fn had written no step and returned no dict.
    with pytest.raises(ConfigurationError, match=r"got float 1.0: what loss_fn returned"):
        fit(loss_fn=lambda out, y: 1.0)

    class Misspelt(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return {"los": F.cross_entropy(self.layer(batch[0]), batch[1])}

    with pytest.raises(ConfigurationError, match=r"a dict without 'loss' \(its keys: 'los'\)"):
        fit(Misspelt(), loss_fn=None)


def test_a_model_returning_a_tuple_to_loss_fn_gets_a_hint():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def forward(self, x):
            return self.layer(x), x

    # torch's TypeError ("argument 'input' must be Tensor, not tuple") stays, with
    # the note saying where the tuple came from and what to do.
    with pytest.raises(TypeError, match="must be Tensor, not tuple") as info:
        fit(Pair())
    assert any("the model returned a tuple, given to loss_fn" in n for n in info.value.__notes__)


def test_loss_without_grad():
    with pytest.raises(ConfigurationError, match="does not require grad"):
        fit(loss_fn=lambda out, y: F.cross_entropy(out, y).detach())


def test_model_without_trainable_parameters():
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="no trainable parameters"):
        fit(model)


class ManualGAN(nn.Module):
    """Lightning's manual optimization, ported as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class OneStepPerOptimizer(nn.Module):
    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.optimizers = optimizers

    def training_step(self, batch, batch_idx, optimizer_idx):
        inputs, targets = batch
        return F.cross_entropy(self.layer(inputs), targets)

    def configure_optimizers(self):
        return [torch.optim.SGD([p], lr=0.1) for p in self.layer.parameters()][: self.optimizers]


class OptionalStepPerOptimizer(OneStepPerOptimizer):
    def training_step(self, batch, batch_idx, optimizer_idx=0):
        return super().training_step(batch, batch_idx, optimizer_idx)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (ManualGAN, "ManualGAN sets automatic_optimization = False"),
        (lambda: torch.compile(ManualGAN()), "ManualGAN sets automatic_optimization = False"),
        (OneStepPerOptimizer, "has a training_step taking optimizer_idx"),
    ],
)
def test_lightnings_manual_optimization_is_refused_before_setup(model, message):
    # self.optimizers() failed mid-step with an AttributeError; the 1.x step with a
    # TypeError.
    recorder = HookRecorder(["setup"])
    with pytest.raises(ConfigurationError, match=message) as raised:
        fit(model(), trainer=hooktrain.Trainer(plugins=[recorder], device="cpu"))
    assert "a loop of your own" in str(raised.value)
    assert recorder.calls == []


def test_a_step_whose_optimizer_idx_has_a_default_trains_with_one_optimizer_only():
    # With one optimizer Lightning 1.x never passed the index either: that model
    # trains as it did. With two, every optimizer would step on optimizer 0's loss.
    assert fit(OptionalStepPerOptimizer(1), optimizer=None).global_step > 0
    recorder = HookRecorder(["on_fit_start"])
    with pytest.raises(ConfigurationError, match="has a training_step taking optimizer_idx"):
        fit(
            OptionalStepPerOptimizer(2),
            trainer=hooktrain.Trainer(plugins=[recorder], device="cpu"),
            optimizer=None,
        )
    assert recorder.calls == []


def test_a_model_attribute_named_like_lightnings_switch_left_on_trains():
    model = make_model()
    model.automatic_optimization = True
    assert fit(model).global_step > 0


def test_an_optimizer_given_to_a_model_that_configures_its_own_is_refused():
    # optimizer= won, and the model's Adam and StepLR were dropped without a word.
    class Configures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def forward(self, x):
            return self.layer(x)

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]

    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=r"defines configure_optimizers\(\): give one"):
        fit(Configures(), trainer=trainer)
    assert trainer.global_step == 0
    # The test harness gives its SGD only to a model without an optimizer of its own.
    result = run([], model=Configures(), record=False)
    assert [type(o).__name__ for o in result.trainer.optimizers] == ["Adam"]
    assert len(result.trainer.lr_schedulers) == 1


def test_batch_that_cannot_be_unpacked():
    triples = DataLoader(
        TensorDataset(torch.randn(8, 8), torch.zeros(8).long(), torch.zeros(8)), batch_size=4
    )
    with pytest.raises(ConfigurationError, match=r"cannot unpack the batch.*length 3"):
        fit(loader=triples)


def test_a_dict_batch_that_cannot_be_unpacked_lists_its_keys():
    # It said only "got a dict".
    batches = [{"x": torch.randn(4, 8), "y": torch.zeros(4).long()}]
    with pytest.raises(ConfigurationError, match=r"got a dict with keys 'x', 'y'\. A model"):
        fit(loader=batches)


def test_a_plain_model_of_several_inputs_is_told_it_gets_them_as_one():
    # A bare "forward() missing 1 required positional argument" named no cause.
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def forward(self, a, b):
            return self.layer(a) + self.layer(b)

    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="missing 1 required positional argument") as info:
        fit(TwoInputs(), loader=[((x, x), torch.zeros(4).long())])
    assert "the inputs as one argument (here a tuple of 2)" in "\n".join(info.value.__notes__)

    class TakesTheTuple(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def forward(self, xs):
            a, b = xs
            return self.layer(a, b)  # a bug inside forward, not its signature

    with pytest.raises(TypeError) as info:
        fit(TakesTheTuple(), loader=[((x, x), torch.zeros(4).long())])
    assert not any("as one argument" in note for note in info.value.__notes__)


def test_a_validation_batch_that_cannot_be_unpacked_names_validation_step():
    train, _ = make_data()
    triples = DataLoader(
        TensorDataset(torch.randn(8, 8), torch.zeros(8).long(), torch.zeros(8)), batch_size=4
    )
    with pytest.raises(ConfigurationError, match=r"length 3.*define validation_step\(batch"):
        fit(loader=train, val_dataloaders=triples)


@pytest.mark.parametrize("where", ["train_dataloaders", "val_dataloaders"])
def test_a_string_is_not_taken_for_a_loader(where):
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    loaders = {"train_dataloaders": make_data()[0], "val_dataloaders": None, where: "data.pt"}
    with pytest.raises(ConfigurationError, match=rf"{where} must be an iterable.*got str"):
        trainer.fit(make_model(), **loaders, loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)
    assert trainer.global_step == 0


def test_a_dict_of_validation_loaders_is_refused_before_training():
    # Lightning takes a dict; read as one loader it used to fail with "cannot unpack
    # the batch" after a whole training epoch.
    train, val = make_data()
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(
        ConfigurationError, match=r"dict of dataloaders \('digits', 'noise'\).*list"
    ):
        fit(loader=train, trainer=trainer, val_dataloaders={"digits": val, "noise": val})
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_epochs", 0),
        ("limit_val_batches", -1),
        ("limit_predict_batches", 0.5),
        ("max_epochs", 1.5),
        ("max_steps", 0),
        ("accumulate_grad_batches", 0),
        ("log_every_n_steps", 0),
        ("gradient_clip_val", -1.0),
        ("gradient_clip_val", "1"),
        ("gradient_clip_val", True),
        ("limit_train_batches", -1),
        ("limit_train_batches", 0),
        ("seed", "abc"),
        ("seed", 1.5),
        ("seed", -1),
        ("check_finite_every_step", "no"),
        ("check_finite_every_step", 1),
    ],
)
def test_bad_trainer_options(option, value):
    with pytest.raises(ConfigurationError, match=f"^{option} must be .*, got {value!r}$"):
        hooktrain.Trainer(plugins=[], **{option: value})


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_loss_named_by_a_string_is_refused_before_any_batch(stage):
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    train, val = make_data()
    with pytest.raises(ConfigurationError, match=r"loss_fn must be a function .*got str"):
        if stage == "fit":
            fit(trainer=trainer, loader=train, loss_fn="cross_entropy")
        else:
            trainer.validate(make_model(), val, loss_fn="cross_entropy")


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_loss_module_class_for_its_instance_is_refused_before_any_batch(stage):
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    train, val = make_data()
    expected = r"loss_fn is the class CrossEntropyLoss, not a loss: .*CrossEntropyLoss\(\)"
    with pytest.raises(ConfigurationError, match=expected):
        if stage == "fit":
            fit(trainer=trainer, loader=train, loss_fn=torch.nn.CrossEntropyLoss)
        else:
            trainer.validate(make_model(), val, loss_fn=torch.nn.CrossEntropyLoss)
    assert trainer.global_step == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_cuda_device_torch_cannot_see_is_refused_when_the_trainer_is_built(device):
    with pytest.raises(ConfigurationError, match=r"this torch sees 0 CUDA device\(s\)"):
        hooktrain.Trainer(plugins=[], device=device)


def test_a_device_name_torch_does_not_know_is_refused():
    with pytest.raises(ConfigurationError, match="'gpu0' is not a torch device"):
        hooktrain.Trainer(plugins=[], device="gpu0")


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ([hooktrain.accuracy], r"metrics must be a dict of names to metrics .*got list"),
        ({"acc": "accuracy"}, r"metrics\['acc'\] must be a function .*got str"),
    ],
)
def test_metrics_that_cannot_be_computed_are_refused_before_training(metrics, message):
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=message):
        fit(trainer=trainer, metrics=metrics)
    assert trainer.global_step == 0


class ReturnsOnlyItsLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


class ReturnsOutputsWithoutTargets(ReturnsOnlyItsLoss):
    def training_step(self, batch, batch_idx):
        outputs = self(batch[0])
        return {"loss": F.cross_entropy(outputs, batch[1]), "outputs": outputs}

    def validation_step(self, batch, batch_idx):
        outputs = self(batch[0])
        return {"loss": F.cross_entropy(outputs, batch[1]), "outputs": outputs}


# Outputs without targets raised a bare KeyError in training, after the first step.
@pytest.mark.parametrize("model", [ReturnsOnlyItsLoss, ReturnsOutputsWithoutTargets])
def test_metrics_a_models_own_steps_give_nothing_to_are_warned_about_per_stage(model):
    train, val = make_data()
    with pytest.warns(UserWarning) as caught:
        trainer = fit(
            model(),
            train,
            loss_fn=None,
            val_dataloaders=val,
            metrics={"acc": hooktrain.accuracy},
        )
    messages = [str(w.message) for w in caught if "computed nothing" in str(w.message)]
    assert len(messages) == 2
    assert "in train: the model's training_step returned no 'outputs'" in messages[0]
    assert "in validate: the model's validation_step returned no 'outputs'" in messages[1]
    assert set(trainer.metrics) == {"loss", "val_loss"}


def test_metrics_computed_by_the_core_step_are_not_warned_about():
    train, val = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = fit(loader=train, val_dataloaders=val, metrics={"acc": hooktrain.accuracy})
    assert {"acc", "val_acc"} <= set(trainer.metrics)


def test_max_steps_that_max_epochs_cuts_short_is_warned_about():
    trainer = hooktrain.Trainer(plugins=[], device="cpu", max_steps=20)  # max_epochs=1
    with pytest.warns(
        UserWarning,
        match=r"max_steps=20 will not be reached: max_epochs=1 ends "
        r"the fit after 8 optimizer steps",
    ):
        fit(trainer=trainer)  # 8 batches an epoch
    assert trainer.global_step == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(trainer=hooktrain.Trainer(plugins=[], device="cpu", max_steps=20, max_epochs=3))


def test_a_fit_shorter_than_log_every_n_steps_with_a_logger_is_warned_about():
    # 2 epochs of 8 steps against the default interval of 50: the loggers got the
    # epochs' values and no training-loss curve, without a word.
    class Listens:
        @hookimpl
        def log_metrics(self, metrics, step, scope):
            pass

    trainer = hooktrain.Trainer(plugins=[Listens()], device="cpu", max_epochs=2)
    with pytest.warns(
        UserWarning,
        match=r"log_every_n_steps=50 is more than the 16 optimizer steps of this fit, so "
        r"no step's values reach 'Listens', only the epochs'",
    ):
        fit(trainer=trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # One log point within the fit, or no logger listening: nothing to say.
        fit(trainer=hooktrain.Trainer(plugins=[Listens()], device="cpu", log_every_n_steps=8))
        fit(trainer=hooktrain.Trainer(plugins=[], device="cpu", max_epochs=2))
        # A progress bar (the default plugins) shows values but draws no curve.
        bar = type("Bar", (Listens,), {"exclusive_roles": ("progress-bar",)})()
        fit(trainer=hooktrain.Trainer(plugins=[bar], device="cpu", max_epochs=2))


def test_missing_loss_fn_and_optimizer():
    with pytest.raises(ConfigurationError, match="loss_fn"):
        fit(loss_fn=None)
    with pytest.raises(ConfigurationError, match="optimizer"):
        fit(optimizer=None)
    with pytest.raises(ConfigurationError, match="optimizer"):
        fit(optimizer="adam")


class Replaces:
    """Replaces the model or the optimizers in a hook after prepare."""

    name = "replaces"

    def __init__(self, what: str, hook: str) -> None:
        self.what, self.hook = what, hook

    def _replace(self, trainer, hook):
        if hook != self.hook:
            return
        if self.what == "optimizers":
            trainer.optimizers = []
        else:
            trainer.model = make_model(seed=1)

    @hookimpl
    def on_fit_start(self, trainer):
        self._replace(trainer, "on_fit_start")

    @hookimpl
    def on_train_epoch_start(self, trainer):
        self._replace(trainer, "on_train_epoch_start")


@pytest.mark.parametrize("hook", ["on_fit_start", "on_train_epoch_start"])
@pytest.mark.parametrize("what", ["optimizers", "model"])
def test_a_model_or_optimizers_replaced_after_prepare_is_refused(what, hook):
    # The step is built from what prepare left: emptied optimizers trained nothing
    # (6 steps, weights unchanged) and a replaced one was ignored, without a word.
    trainer = hooktrain.Trainer(plugins=[Replaces(what, hook)], device="cpu", max_epochs=2)
    with pytest.raises(ConfigurationError) as excinfo:
        fit(trainer=trainer)
    assert f"trainer.{what} replaced during fit, after prepare" in str(excinfo.value)
    # Before the first step when replaced in on_fit_start; else as the next epoch starts.
    epoch = 0 if hook == "on_fit_start" else 1
    assert f"(found at epoch {epoch}, global step {8 * epoch})" in str(excinfo.value)


class FreezesInPrepare:
    """Replaces the optimizers in prepare, where it may, with one that moves nothing."""

    name = "freezes_in_prepare"

    @hookimpl
    def prepare(self, trainer):
        trainer.optimizers = [torch.optim.SGD(trainer.model.parameters(), lr=0.0)]


def test_optimizers_replaced_in_prepare_are_the_ones_stepped():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fit(model, trainer=hooktrain.Trainer(plugins=[FreezesInPrepare()], device="cpu"))
    assert trainer.global_step > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_an_optimizer_over_another_models_parameters_is_refused_before_training():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    other = torch.optim.SGD(make_model().parameters(), lr=0.5)
    with pytest.raises(ConfigurationError, match="holds none of the model's parameters"):
        fit(model, optimizer=other)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # A subset of the model's parameters, or extra tensors beside them, are fine.
    fit(model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))
    extra = torch.zeros(3, requires_grad=True)
    fit(model, optimizer=torch.optim.SGD([*model.parameters(), extra], lr=0.1))


class ConfiguresItself(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.config = config

    def forward(self, x):
        return self.layer(x)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
        return self.config(optimizer, scheduler)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            lambda o, s: {"optimizer": o, "scheduler": s},
            r"dict has the key 'scheduler', which hooktrain does not read\. "
            r"Did you mean 'lr_scheduler'\?",
        ),
        (lambda o, s: {"opt": o}, r"dict has the key 'opt'"),
        (lambda o, s: {"lr_scheduler": s}, r"needs the key 'optimizer'"),
        (
            lambda o, s: {"optimizer": o, "lr_scheduler": {"sched": s}},
            r"an lr_scheduler dict has the key 'sched'.*Did you mean 'scheduler'",
        ),
        (
            lambda o, s: {"optimizer": o, "lr_scheduler": {"interval": "step"}},
            r"an lr_scheduler dict needs the key 'scheduler'",
        ),
    ],
)
def test_a_configure_optimizers_dict_with_a_key_nobody_reads_is_refused(config, message):
    with pytest.raises(ConfigurationError, match=message):
        fit(ConfiguresItself(config), optimizer=None)


def test_lightnings_scheduler_name_is_accepted():
    config = lambda o, s: {"optimizer": o, "lr_scheduler": {"scheduler": s, "name": "lr"}}  # noqa: E731
    trainer = fit(ConfiguresItself(config), optimizer=None)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5  # stepped after the epoch


def test_not_a_module():
    with pytest.raises(ConfigurationError, match=r"torch\.nn\.Module"):
        fit(model=lambda x: x)


class NaNAfter(nn.Module):
    """Produces NaN outputs from the given global step on."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.calls = 0
        self.step = step

    def forward(self, x):
        self.calls += 1
        out = self.layer(x)
        return out * math.nan if self.calls > self.step else out


def test_nan_loss_is_caught_at_the_log_interval_naming_the_step_range():
    trainer = hooktrain.Trainer(plugins=[], device="cpu", max_epochs=3, log_every_n_steps=4)
    with pytest.raises(NonFiniteLossError, match="between global steps 5 and 8"):
        fit(NaNAfter(step=6), trainer=trainer)


def test_nan_loss_every_step_option_names_the_exact_step():
    trainer = hooktrain.Trainer(
        plugins=[], device="cpu", max_epochs=3, log_every_n_steps=50, check_finite_every_step=True
    )
    with pytest.raises(NonFiniteLossError, match="batch 6, global step 6: the step") as caught:
        fit(NaNAfter(step=6), trainer=trainer)
    # The note the core adds counts global steps the same way.
    assert caught.value.__notes__ == ["hooktrain: raised during fit at epoch 0, global step 6"]
    assert trainer.global_step == 6


class SavesEvery:
    """Dumps a checkpoint every ``every`` steps, as a checkpoint plugin does, and
    notes each step whose batch end it saw."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.saved: list[int] = []
        self.batch_ends: list[int] = []

    @hookimpl
    def on_train_batch_end(self, trainer):
        self.batch_ends.append(trainer.global_step)
        if trainer.global_step % self.every == 0:
            checkpoint = trainer.dump_checkpoint()
            self.saved.append(checkpoint["progress"]["global_step"])


def test_a_checkpoint_between_log_points_is_refused_after_a_nan_loss():
    # Weights a NaN trained, saved between two log points, would replace the last
    # good checkpoint; the refusal is the run's error, not the saving plugin's.
    saver = SavesEvery(2)
    trainer = hooktrain.Trainer(plugins=[saver], device="cpu", max_epochs=3, log_every_n_steps=50)
    with pytest.raises(NonFiniteLossError, match="between global steps 1 and 4 ") as caught:
        fit(NaNAfter(step=3), trainer=trainer)
    assert "the checkpoint due at global step 4 was not written" in str(caught.value)
    assert saver.saved == [2]


def test_a_nan_loss_at_a_log_point_stops_the_step_before_its_batch_end():
    # Checked right after the optimizer step: no hook of that step (a step-wise
    # save, a validation) sees the weights it produced.
    saver = SavesEvery(2)
    trainer = hooktrain.Trainer(plugins=[saver], device="cpu", max_epochs=3, log_every_n_steps=4)
    with pytest.raises(NonFiniteLossError, match="between global steps 1 and 4 ") as caught:
        fit(NaNAfter(step=3), trainer=trainer)
    assert "checkpoint" not in str(caught.value)  # the loop's check, not the save's
    assert saver.saved == [2]
    assert saver.batch_ends == [1, 2, 3]


def test_a_nan_loss_after_the_last_log_point_fails_the_fit_that_max_steps_ends():
    # max_steps=6 ends the fit between log points (every 4) and before the epoch's
    # end (8 steps): the NaN from step 5 on was never read, and fit returned.
    trainer = hooktrain.Trainer(
        plugins=[], device="cpu", max_epochs=3, max_steps=6, log_every_n_steps=4
    )
    with pytest.raises(NonFiniteLossError, match="between global steps 5 and 6 "):
        fit(NaNAfter(step=4), trainer=trainer)


def test_metric_logged_with_a_bad_value():
    class Logger:
        @hookimpl
        def on_train_batch_end(self, trainer):
            trainer.log("bad", torch.ones(3))

    with pytest.raises(HookError, match="single number"):
        run([Logger()], max_epochs=1, record=False)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ConfigurationError, match=r"nope\.pt. does not exist\n"):
        fit(ckpt_path=tmp_path / "nope.pt")
    # Lightning's "best" said only that it does not exist.
    with pytest.raises(ConfigurationError, match="'best' does not exist; ckpt_path takes a file"):
        fit(ckpt_path="best")
    with pytest.raises(ConfigurationError, match="'last' needs a plugin"):
        fit(ckpt_path="last")
    # A directory was reported as torch.load's "[Errno 21] Is a directory".
    with pytest.raises(ConfigurationError, match=r"is a directory; the core alone reads a file"):
        fit(ckpt_path=tmp_path)


@pytest.mark.parametrize("content", ["state_dict", "lightning-like"])
def test_a_file_that_is_not_a_hooktrain_checkpoint_is_refused_before_training(tmp_path, content):
    model = make_model()
    path = tmp_path / "weights.pt"
    state = model.state_dict()
    torch.save(state if content == "state_dict" else {"state_dict": state}, path)
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=r"is not a hooktrain checkpoint.*load_state_dict"):
        fit(model, trainer=trainer, ckpt_path=path)
    assert trainer.global_step == 0


def test_a_missing_metric_names_the_per_loader_one() -> None:
    # The docs' smallest plugin reads trainer.metrics["val_loss"]; with two validation
    # loaders that raised a bare KeyError: 'val_loss'.
    from hooktrain.metrics import Metrics

    metrics = Metrics()
    for name, value in (("loss", 1.0), ("val_loss/dataloader_idx_0", 2.0)):
        metrics.set(name, value)
    with pytest.raises(KeyError, match=r"did you mean 'val_loss/dataloader_idx_0'\?"):
        metrics["val_loss"]
    assert "val_loss" not in metrics and metrics.get("val_loss", -1.0) == -1.0
    assert metrics.get("loss") == 1.0 and dict(metrics) == {
        "loss": 1.0,
        "val_loss/dataloader_idx_0": 2.0,
    }


class NoSamples(IterableDataset):
    """An iterable dataset that yields nothing, and has no length to say so early."""

    def __iter__(self):
        return iter(())


def test_an_evaluation_loader_that_yields_nothing_is_named():
    # In fit, the empty validation went unseen until early stopping, monitoring
    # val_loss, said it was never logged and offered 'loss' instead.
    empty = DataLoader(NoSamples(), batch_size=4)
    train, val = make_data()
    trainer = hooktrain.Trainer(plugins=["early_stopping"], max_epochs=2, device="cpu")
    with pytest.raises(ConfigurationError, match="the validate dataloader yielded no batches"):
        trainer.fit(make_model(), train, empty, loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)
    trainer = hooktrain.Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match="the test dataloader 1 yielded no batches"):
        trainer.test(make_model(), [val, empty], loss_fn=F.cross_entropy)
    with pytest.raises(ConfigurationError, match="the predict dataloader yielded no batches"):
        trainer.predict(make_model(), empty)


def test_a_lightning_style_train_name_is_pointed_at_hooktrains_own():
    # difflib offered val_loss for train_loss, a validation metric for a training one.
    assert missing_monitor_hint("train_loss", ["loss", "val_loss"]) == "Did you mean 'loss'?"
    assert missing_monitor_hint("train_acc", ["acc", "loss"]) == "Did you mean 'acc'?"
    assert missing_monitor_hint("val_los", ["loss", "val_loss"]) == "Did you mean 'val_loss'?"
