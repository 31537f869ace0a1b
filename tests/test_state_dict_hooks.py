"""``get_state_dict`` and ``set_state_dict``: how a checkpoint's model and optimizer
states are taken and loaded, which a sharding plugin replaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hooktrain import ConfigurationError, Trainer, hookimpl
from hooktrain.errors import PluginError
from hooktrain.testing import make_data, make_model, run


class SaveAt:
    """Saves ``trainer.dump_checkpoint()`` after ``step`` optimizer steps."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        self.step = step

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step:
            torch.save(trainer.dump_checkpoint(), self.path)


class NamedOptimizerState:
    """Returns the optimizer state keyed by parameter name, as DCP's
    ``get_optimizer_state_dict`` does, instead of the core's positional form."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def get_state_dict(self, trainer: Trainer) -> tuple[dict[str, Any], list[Any]]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self.calls.append("get_state_dict")
        module = trainer.module
        return module.state_dict(), [
            get_optimizer_state_dict(module, o) for o in trainer.optimizers
        ]

    @hookimpl(wrapper=True)
    def set_state_dict(self, optimizer_state_dicts: list[Any]) -> Any:
        self.calls.append(f"set_state_dict:{type(next(iter(optimizer_state_dicts[0]['state'])))}")
        return (yield)


def fit(tmp: Path, plugins: list[Any], **kwargs: Any) -> torch.nn.Module:
    model = make_model()
    trainer = Trainer(plugins=plugins, seed=0, device="cpu", max_epochs=2)
    train, val = make_data(n=64, batch_size=16)
    optimizer = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    trainer.fit(
        model, train, val, loss_fn=torch.nn.functional.cross_entropy, optimizer=optimizer, **kwargs
    )
    return model


@pytest.mark.parametrize("named", [False, True], ids=["positional", "by-name"])
def test_a_resume_loads_the_optimizer_state_of_either_form(tmp_path, named) -> None:
    uninterrupted = fit(tmp_path, [])
    path = tmp_path / "ckpt.pt"
    hooks = NamedOptimizerState()
    fit(tmp_path, [SaveAt(path, 3)] + ([hooks] if named else []))
    saved = torch.load(path, weights_only=True)
    keys = set(saved["optimizers"][0]["state"])
    assert keys == ({"0.weight", "0.bias", "2.weight", "2.bias"} if named else {0, 1, 2, 3})
    # The core's default set_state_dict loads either form into a plain run.
    resumed_hooks = NamedOptimizerState()
    resumed = fit(tmp_path, [resumed_hooks], ckpt_path=path)
    expected = "<class 'str'>" if named else "<class 'int'>"
    assert resumed_hooks.calls[0] == f"set_state_dict:{expected}"
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_the_loop_calls_both_hooks_around_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    saving = run([SaveAt(path, 2)], limit_train_batches=2)
    assert saving.recorder.count("get_state_dict") == 1
    assert saving.recorder.count("on_save_checkpoint") == 1
    resumed = run(max_epochs=3, fit_kwargs={"ckpt_path": path}, limit_train_batches=2)
    names = resumed.recorder.names()
    assert names.index("load_checkpoint") < names.index("set_state_dict")
    assert names.index("set_state_dict") < names.index("on_load_checkpoint")


def test_a_checkpoint_of_another_optimizer_class_is_refused_before_training(tmp_path) -> None:
    # torch loaded Adam's state into SGD without a word; the first step then failed
    # inside SGD with KeyError: 'momentum', naming neither the checkpoint nor Adam.
    path = tmp_path / "adam.pt"
    fit(tmp_path, [SaveAt(path, 3)])
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    trainer = Trainer(plugins=[], seed=0, device="cpu", max_epochs=2)
    train, _ = make_data(n=64, batch_size=16)
    with pytest.raises(ConfigurationError, match=r"optimizer 0 .* this run's SGD.*betas.*momentum"):
        trainer.fit(
            model,
            train,
            loss_fn=torch.nn.functional.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            ckpt_path=path,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_settings_an_lr_scheduler_adds_do_not_make_another_optimizer_kind() -> None:
    from hooktrain.state import check_optimizer_kind

    params = [torch.nn.Parameter(torch.zeros(2))]
    saved_sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(saved_sgd, max_lr=0.1, total_steps=10)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    torch.optim.swa_utils.SWALR(sgd, swa_lr=0.05)
    # OneCycleLR's max_lr and momentum bounds on one side, SWALR's swa_lr on the
    # other: another scheduler, the same optimizer class.
    check_optimizer_kind(0, sgd, saved_sgd.state_dict())
    with pytest.raises(ConfigurationError, match=r"this run's SGD: .*betas.*lack.*momentum"):
        check_optimizer_kind(0, sgd, torch.optim.Adam(params).state_dict())


def test_a_wrapped_optimizer_is_named_by_the_class_it_wraps() -> None:
    from hooktrain.state import check_optimizer_kind

    class Wrapper:
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups
            self.defaults = optimizer.defaults

    params = [torch.nn.Parameter(torch.zeros(2))]
    wrapped = Wrapper(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ConfigurationError, match=r"this run's SGD: its settings include"):
        check_optimizer_kind(0, wrapped, torch.optim.Adam(params).state_dict())


class Scheduled(torch.nn.Module):
    """``make_model()`` with its own optimizer and an LR scheduler of ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = make_model()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedulers = {
            "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4),
            "cyclic": lambda: torch.optim.lr_scheduler.CyclicLR(optimizer, 0.01, 0.1),
        }
        return {"optimizer": optimizer, "lr_scheduler": schedulers[self.kind]()}


@pytest.mark.parametrize("resumed_kind", ["cosine", "cyclic"])
def test_a_checkpoint_of_another_scheduler_class_is_refused_before_anything_loads(
    tmp_path, resumed_kind
) -> None:
    # torch loaded StepLR's state into CosineAnnealingLR without a word (mixing the
    # two), and into CyclicLR with a bare KeyError: '_scale_fn_custom'.
    path = tmp_path / "step.pt"
    train, _ = make_data(n=64, batch_size=16)
    Trainer(plugins=[SaveAt(path, 3)], seed=0, device="cpu", max_epochs=1).fit(
        Scheduled("step"), train
    )
    model = Scheduled(resumed_kind)
    before = [p.clone() for p in model.parameters()]
    trainer = Trainer(plugins=[], seed=0, device="cpu", max_epochs=2)
    name = {"cosine": "CosineAnnealingLR", "cyclic": "CyclicLR"}[resumed_kind]
    with pytest.raises(
        ConfigurationError, match=rf"LR scheduler 0 .* this run's {name}: .*step_size.*lack"
    ):
        trainer.fit(model, train, ckpt_path=path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_scheduler_state_from_another_torch_version_still_loads() -> None:
    from hooktrain.state import check_scheduler_kind

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    # Attributes a newer or older torch adds differ one way only.
    older = {k: v for k, v in scheduler.state_dict().items() if k != "_is_initial"}
    newer = {**scheduler.state_dict(), "_added_later": 1}
    check_scheduler_kind(0, scheduler, older)
    check_scheduler_kind(0, scheduler, newer)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    with pytest.raises(ConfigurationError, match=r"this run's StepLR: .*T_max.*lack .*step_size"):
        check_scheduler_kind(0, scheduler, cosine.state_dict())


class KeepsState:
    """Puts ``value`` into its checkpoint state."""

    name = "keeps_state"

    def __init__(self, value: Any) -> None:
        self.value = value

    @hookimpl
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"][self.name] = {"counters": [1, {"last": self.value}]}


@pytest.mark.parametrize("value", [np.float64(1.5), Path("runs"), object()])
def test_a_state_torch_load_would_refuse_fails_the_save_naming_the_plugin(tmp_path, value):
    # Every checkpoint of the run was written with it, and only the resume found
    # out: weights_only refused the file, blaming no plugin.
    with pytest.raises(
        PluginError,
        match=r"plugin 'keeps_state' put a .* at checkpoint\['plugins'\]"
        r"\['keeps_state'\]\['counters'\]\[1\]\['last'\]",
    ):
        fit(tmp_path, [KeepsState(value), SaveAt(tmp_path / "a.ckpt", step=2)])
    assert not (tmp_path / "a.ckpt").exists()


def test_a_state_torch_load_reads_is_saved_and_restored(tmp_path):
    value = (torch.Size([2, 3]), torch.float16, {1, 2})
    fit(tmp_path, [KeepsState(value), SaveAt(tmp_path / "a.ckpt", step=2)])
    loaded = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert loaded["plugins"]["keeps_state"]["counters"][1]["last"] == value


class WrongStateDicts:
    name = "wrong_state_dicts"

    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def get_state_dict(self) -> Any:
        return self.result


@pytest.mark.parametrize("result", ["model", ({}, []), ([], [{}]), ({}, {})])
def test_a_get_state_dict_result_without_the_model_and_optimizers_fails_the_save(tmp_path, result):
    # ({}, []) wrote checkpoints with no model and no optimizer in them, and the
    # plugin kept evicting the good ones until a resume failed.
    with pytest.raises(PluginError, match=r"get_state_dict.*'wrong_state_dicts'"):
        fit(tmp_path, [WrongStateDicts(result), SaveAt(tmp_path / "a.ckpt", step=2)])
