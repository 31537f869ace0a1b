"""hooktrain's warnings: shown at the user's line, once where Python's default filter
says once, and given where a fit would otherwise go wrong without a word."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hooktrain
from hooktrain import ConfigurationError, Trainer, hookimpl
from hooktrain.errors import warn_user
from hooktrain.testing import make_data, make_model


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


class OwnSteps(nn.Module):
    """A Lightning-style model: its own steps, optimizer and epoch-wise scheduler."""

    def __init__(self, validation_returns: bool = True, scheduler: str = "step") -> None:
        super().__init__()
        self.net = make_model()
        self.validation_returns = validation_returns
        self.scheduler = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs), targets)
        return loss if self.validation_returns else None  # a Lightning habit: log, return None

    def configure_optimizers(self) -> Any:
        optimizer = sgd(self.parameters())
        if self.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
            return {"optimizer": optimizer, "lr_scheduler": plateau}
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]


def test_warn_user_skips_hooktrains_own_frames() -> None:
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(UserWarning, match="shown here") as record:
        warn_user("shown here")
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_a_warning_found_deep_in_the_loop_points_at_the_fit_line() -> None:
    train, _ = make_data(n=64, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu", max_steps=10)
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(UserWarning, match="max_steps=10 will not be reached") as record:
        trainer.fit(make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd)
    # It was shown from stages.py, inside the stage runner, before.
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_a_plugins_warning_from_inside_a_hook_points_at_the_fit_line(tmp_path) -> None:
    train, val = make_data(n=64, batch_size=16)
    options = {"dirpath": str(tmp_path), "every_n_train_steps": 2, "monitor": "val_loss"}
    trainer = Trainer(plugins=[("checkpoint", options)], device="cpu")
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(UserWarning, match="no checkpoint of this fit will be ranked") as record:
        trainer.fit(make_model(), train, val, loss_fn=F.cross_entropy, optimizer=sgd)
    # It was shown from pluggy's _execution.py before.
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_an_epoch_wise_scheduler_does_not_make_once_only_warnings_repeat() -> None:
    # Stepping the scheduler inside warnings.catch_warnings() at every epoch's end
    # reset Python's record of warnings already shown: this one came once an epoch.
    train, _ = make_data(n=64, batch_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        Trainer(plugins=[], device="cpu", max_epochs=4).fit(
            OwnSteps(), train, metrics={"acc": lambda outputs, targets: outputs.sum()}
        )
    shown = [w for w in record if "computed nothing in train" in str(w.message)]
    assert len(shown) == 1


def test_a_validation_that_computes_nothing_is_warned_about_once() -> None:
    train, val = make_data(n=64, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu", max_epochs=3)
    with pytest.warns(UserWarning, match="validation in fit computed no metric") as record:
        trainer.fit(OwnSteps(validation_returns=False), train, val)
    assert len([w for w in record if "computed no metric" in str(w.message)]) == 1
    assert sorted(trainer.metrics) == ["loss"]


def test_a_validation_that_computes_something_or_nothing_by_request_is_not_warned_about() -> None:
    train, val = make_data(n=64, batch_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Trainer(plugins=[], device="cpu", max_epochs=2).fit(OwnSteps(), train, val)
        Trainer(plugins=[], device="cpu", max_epochs=2, limit_val_batches=0).fit(
            OwnSteps(validation_returns=False), train, val
        )
    assert not [w for w in record if "computed no metric" in str(w.message)]


def test_a_plateau_scheduler_whose_validation_computes_nothing_is_an_error() -> None:
    # It was skipped at every epoch as if validation had not run: the learning rate
    # never changed, without a word.
    train, val = make_data(n=64, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu", max_epochs=3)
    with (
        pytest.warns(UserWarning, match="computed no metric"),
        pytest.raises(
            ConfigurationError, match=r"monitors 'val_loss', which this epoch did not"
        ) as info,
    ):
        trainer.fit(OwnSteps(validation_returns=False, scheduler="plateau"), train, val)
    assert "Validation ran and computed no metric: return the loss" in str(info.value)
    assert trainer.current_epoch == 0  # at the first epoch's end


def test_a_plateau_scheduler_skips_epochs_without_validation() -> None:
    train, val = make_data(n=64, batch_size=16)
    model = OwnSteps(scheduler="plateau")
    trainer = Trainer(plugins=[], device="cpu", max_epochs=4, check_val_every_n_epoch=2)
    trainer.fit(model, train, val)
    # Stepped after epochs 1 and 3 only, the ones that validated.
    assert trainer.lr_schedulers[0].last_epoch == 2


def test_a_model_left_in_eval_mode_is_warned_about_and_a_frozen_part_is_not() -> None:
    # After a manual check under model.eval() the fit trained with dropout off,
    # without a word; a frozen submodule is a choice the loop keeps.
    train = make_data()[0]
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    with pytest.warns(UserWarning, match="Sequential is in eval mode as fit starts"):
        Trainer(plugins=[], device="cpu").fit(model, train, loss_fn=F.cross_entropy, optimizer=sgd)
    model.train()
    model[1].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(plugins=[], device="cpu").fit(model, train, loss_fn=F.cross_entropy, optimizer=sgd)
    assert not model[1].training and model.training


def test_validation_limited_to_no_batch_does_not_blame_the_step() -> None:
    # With limit_val_batches=0 no validation batch ran, and the warning said the
    # model's validation_step returned no outputs for metrics=.
    train, val = make_data(n=64, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu", max_epochs=1, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(
            make_model(),
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=sgd,
            metrics={"acc": hooktrain.accuracy},
        )
    assert "acc" in trainer.metrics  # the training epoch computed it
    assert not [w for w in record if "computed nothing" in str(w.message)]


class Listener:
    """A logger that keeps nothing: what matters is that log_metrics is implemented."""

    @hooktrain.hookimpl
    def log_metrics(self) -> None:
        pass


class LogsAt:
    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hooktrain.hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.hook == "on_train_epoch_end":
            trainer.log("best", 1.0)

    @hooktrain.hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        if self.hook == "on_fit_end":
            trainer.log("best", 1.0)

    @hooktrain.hookimpl
    def teardown(self, trainer: Trainer) -> None:
        if self.hook == "teardown":
            trainer.log("final", 2.0)


@pytest.mark.parametrize(
    ("hook", "warned"),
    [("on_fit_end", "'best'"), ("teardown", "'final'"), ("on_train_epoch_end", None)],
)
def test_a_value_logged_after_the_last_publication_is_warned_about(
    hook: str, warned: str | None
) -> None:
    # It reached trainer.metrics and no logger, without a word (Lightning refuses
    # trainer.log in on_fit_end).
    train = make_data(n=64, batch_size=16)[0]
    listener = Listener()
    trainer = Trainer(plugins=[LogsAt(hook), listener], device="cpu", log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd)
    found = [str(w.message) for w in record if "reached no logger" in str(w.message)]
    if warned is None:
        assert not found
        assert trainer.metrics["best"] == 1.0
    else:
        assert len(found) == 1
        assert found[0].startswith(f"hooktrain: {warned}, logged with trainer.log, reached no")
        assert "logged in on_fit_end or teardown" in found[0]


def test_values_of_an_epoch_left_open_are_not_said_to_be_logged_too_late() -> None:
    # max_steps stops inside the epoch, after the last log point: a resume continues
    # the epoch, and its values are not on_fit_end's.
    class LogsEveryStep:
        @hooktrain.hookimpl
        def on_train_batch_end(self, trainer: Trainer) -> None:
            trainer.log("lr", 0.1, batch_size=1)

    train = make_data(n=64, batch_size=16)[0]
    trainer = Trainer(
        plugins=[LogsEveryStep(), Listener()], device="cpu", max_steps=3, log_every_n_steps=2
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd)
    assert trainer.global_step == 3
    assert not [w for w in record if "reached no logger" in str(w.message)]


@pytest.mark.parametrize(
    ("stage", "advice"),
    [("validate", "on_validation_end"), ("test", "on_test_end"), ("predict", None)],
)
def test_the_late_log_warning_gives_each_stage_its_own_words(
    stage: str, advice: str | None
) -> None:
    # validate's message said "after validate's last publication (in setup ...)",
    # though setup comes before it; test() was told to log in on_validation_end,
    # which it never calls; predict() publishes nothing, and a value logged in
    # on_predict_end went without a word.
    class LogsLate:
        @hooktrain.hookimpl
        def setup(self, trainer: Trainer) -> None:
            trainer.log("tag", 1.0)

        @hooktrain.hookimpl
        def on_predict_end(self, trainer: Trainer) -> None:
            trainer.log("n_pred", 2.0)

    val = make_data(n=64, batch_size=16)[1]
    trainer = Trainer(plugins=[LogsLate(), Listener()], device="cpu")
    with pytest.warns(UserWarning, match="reached no logger") as record:
        if stage == "predict":
            trainer.predict(make_model(), val)
        else:
            getattr(trainer, stage)(make_model(), val, loss_fn=F.cross_entropy)
    (message,) = [str(w.message) for w in record if "reached no logger" in str(w.message)]
    if advice is None:
        assert message.startswith("hooktrain: 'n_pred', 'tag', logged with trainer.log")
        assert message.endswith("predict() publishes no values")
    else:
        assert message.startswith("hooktrain: 'tag', logged")
        assert f"logged in setup or teardown, outside the {stage} run" in message
        assert message.endswith(f"log it in {advice}")


def test_a_failing_teardown_leaves_no_pending_value_to_the_next_stage() -> None:
    # teardown raising skipped the clean-up: the next validate() warned about the
    # fit's on_fit_end value as its own.
    class Late:
        failed = False

        @hooktrain.hookimpl
        def on_fit_end(self, trainer: Trainer) -> None:
            trainer.log("best", 1.0)

        @hooktrain.hookimpl
        def teardown(self) -> None:
            if not Late.failed:
                Late.failed = True
                raise RuntimeError("teardown failed")

    train, val = make_data(n=64, batch_size=16)
    trainer = Trainer(plugins=[Late(), Listener()], device="cpu")
    with pytest.raises(hooktrain.HookError, match="teardown failed"):
        trainer.fit(make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.validate(make_model(), val, loss_fn=F.cross_entropy)
    assert not [w for w in record if "reached no logger" in str(w.message)]


class WithLightningHooks(OwnSteps):
    """Computes an epoch metric in hooks on the model, as a LightningModule does."""

    def on_train_epoch_end(self) -> None:
        raise AssertionError("hooktrain calls no hook on a model")

    def on_validation_epoch_end(self) -> None:
        raise AssertionError("hooktrain calls no hook on a model")


class WithOwnSetup(WithLightningHooks):
    def setup(self) -> None:
        """A method of the model's own that shares a hook's name: not named."""


def test_hooks_defined_on_the_model_are_named_as_never_called() -> None:
    # They were ignored without a word, and the metric they logged never appeared.
    train, val = make_data()
    with pytest.warns(UserWarning) as caught:
        Trainer(plugins=[], max_epochs=1, device="cpu").fit(WithOwnSetup(), train, val)
    (message,) = [str(w.message) for w in caught if "never calls" in str(w.message)]
    assert message.startswith(
        "hooktrain: WithOwnSetup defines on_train_epoch_end, on_validation_epoch_end, "
        "which hooktrain never calls on a model"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(plugins=[], max_epochs=1, device="cpu").fit(OwnSteps(), train, val)
        # A model that is one of the trainer's plugins has its hooks called.
        model = WithLightningHooks()
        model.on_train_epoch_end = hookimpl(lambda: None)  # an implementation, as a plugin's
        model.on_validation_epoch_end = hookimpl(lambda: None)
        Trainer(plugins=[model], max_epochs=1, device="cpu").fit(model, train, val)


class Distributes:
    """Says the run is distributed, as accelerate or fsdp does in setup, then ends
    the fit before anything collective would run."""

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.world_size = 2

    @hookimpl
    def prepare(self) -> None:
        raise KeyboardInterrupt("stop before training")


def test_a_launched_process_that_no_plugin_distributes_is_warned_about(monkeypatch) -> None:
    # Under torchrun without accelerate or fsdp, each process silently trained its own
    # copy on all of the data.
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, _ = make_data()
    with pytest.warns(UserWarning, match=r"launched as one of 2 \(WORLD_SIZE\), but no plugin"):
        Trainer(plugins=[], device="cpu").fit(
            make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyboardInterrupt):
            Trainer(plugins=[Distributes()], device="cpu").fit(
                make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd
            )
