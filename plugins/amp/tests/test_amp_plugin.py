"""hooktrain-amp on the CPU: bf16 autocast, the fp16 gradient-scaler path, skipped
steps, accumulation and checkpoints. Every test uses the real trainer and torch's
real autocast and GradScaler."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_amp import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hooktrain import ConfigurationError, HookError, Trainer, accuracy, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data


class DtypeProbe(nn.Module):
    """A two-layer net that records the dtype of its hidden activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        self.seen.append((self.training, hidden.dtype))
        return self.fc2(torch.relu(hidden))


class StepModel(DtypeProbe):
    """The probe with its own training step and a per-step LR scheduler."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def fit(plugins: list[Any], model: nn.Module | None = None, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 1)
    fit_kwargs = kwargs.pop("fit_kwargs", {})
    trainer = Trainer(plugins=plugins, device="cpu", seed=0, **kwargs)
    model = model if model is not None else DtypeProbe()
    train, val = make_data(n=64, batch_size=16)
    if callable(getattr(model, "configure_optimizers", None)):
        trainer.fit(model, train, val, **fit_kwargs)
    else:
        trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            **fit_kwargs,
        )
    return trainer


class GradientWatch:
    """Records gradient norms after backward (possibly scaled) and before the
    optimizer step (after unscaling), and what optimizer_step returned."""

    name = "watch"

    def __init__(self) -> None:
        self.after_backward: list[float] = []
        self.before_step: list[float] = []
        self.step_results: list[Any] = []
        self.skipped: list[bool] = []

    @staticmethod
    def _norm(trainer: Trainer) -> float:
        grads = [p.grad for p in trainer.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    @hookimpl
    def on_after_backward(self, trainer: Trainer) -> None:
        self.after_backward.append(self._norm(trainer))

    @hookimpl
    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        self.before_step.append(self._norm(trainer))

    @hookimpl(wrapper=True)
    def optimizer_step(self) -> Any:
        result = yield
        self.step_results.append(result)
        return result

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.sync_gradients:
            self.skipped.append(trainer.last_step_skipped)


class InfGradientAt:
    """Puts an infinite gradient into the first parameter at the given batches."""

    name = "inf-gradient"

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.batch_idx = -1

    @hookimpl
    def on_train_batch_start(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    @hookimpl
    def on_after_backward(self, trainer: Trainer) -> None:
        if self.batch_idx in self.batches:
            next(trainer.module.parameters()).grad[0, 0] = math.inf


def test_amp_is_listed_as_an_installed_plugin() -> None:
    plugin = installed_plugins()["amp"]
    assert plugin.distribution == "hooktrain-amp"
    assert plugin.load() is MixedPrecision


def test_bf16_runs_the_forward_in_bfloat16_for_training_and_validation() -> None:
    model = DtypeProbe()
    trainer = fit([("amp", {"precision": "bf16"})], model=model)
    assert {dtype for training, dtype in model.seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in model.seen if not training} == {torch.bfloat16}
    # Parameters stay in float32: autocast casts per operation, it does not convert the model.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert trainer.metrics["loss"] > 0 and "val_loss" in trainer.metrics
    plugin = trainer.plugin_manager.get_plugin("amp")
    assert plugin.scaler is None  # bf16 needs no loss scaling


def test_without_the_plugin_the_same_probe_sees_float32() -> None:
    model = DtypeProbe()
    fit([], model=model)
    assert {dtype for _, dtype in model.seen} == {torch.float32}


def test_fp16_scales_the_loss_and_unscales_before_on_before_optimizer_step() -> None:
    watch = GradientWatch()
    model = DtypeProbe()
    trainer = fit([("amp", {"precision": "fp16", "init_scale": 1024.0}), watch], model=model)
    assert {dtype for _, dtype in model.seen} == {torch.float16}
    scaler = trainer.plugin_manager.get_plugin("amp").scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    # After backward the gradients carry the loss scale; by the time
    # on_before_optimizer_step runs they are back to their true size.
    for scaled, true in zip(watch.after_backward, watch.before_step, strict=True):
        assert scaled / true == pytest.approx(1024.0, rel=1e-3)
    assert watch.step_results == [True] * 4
    assert watch.skipped == [False] * 4


def test_fp16_with_accumulation_unscales_and_steps_once_per_window(hook_recorder) -> None:
    watch = GradientWatch()
    trainer = fit(
        [
            ("amp", {"precision": "fp16", "init_scale": 256.0, "growth_interval": 1}),
            watch,
            hook_recorder,
        ],
        accumulate_grad_batches=2,
    )
    assert hook_recorder.count("backward") == 4
    assert hook_recorder.count("unscale_gradients") == 2
    assert hook_recorder.count("optimizer_step") == 2
    assert trainer.global_step == 2
    # growth_interval=1: the scale doubles after every good step, i.e. update()
    # ran exactly once per optimizer step, not once per micro-batch.
    assert trainer.plugin_manager.get_plugin("amp").scaler.get_scale() == 256.0 * 4
    # Gradients of two micro-batches are summed, then unscaled once.
    assert watch.after_backward[1] / watch.before_step[0] == pytest.approx(256.0, rel=1e-3)


def test_an_inf_gradient_skips_the_step_and_the_scheduler() -> None:
    watch = GradientWatch()
    model = StepModel()
    lrs: list[float] = []

    class LrWatch:
        @hookimpl
        def on_train_batch_end(self, trainer: Trainer) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    before: dict[str, torch.Tensor] = {}

    class Snapshot:
        @hookimpl
        def on_train_batch_start(self, trainer: Trainer, batch_idx: int) -> None:
            if batch_idx == 1:
                before.update({k: v.clone() for k, v in trainer.module.state_dict().items()})

        @hookimpl
        def on_train_batch_end(self, trainer: Trainer, batch_idx: int) -> None:
            if batch_idx == 1:
                after = trainer.module.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before), "params changed"

    trainer = fit(
        [
            ("amp", {"precision": "fp16", "init_scale": 1024.0}),
            InfGradientAt({1}),
            watch,
            LrWatch(),
            Snapshot(),
        ],
        model=model,
    )
    assert watch.step_results == [True, False, True, True]
    assert watch.skipped == [False, True, False, False]
    # StepLR halves the LR per step taken: steps 0, 2 and 3 only.
    assert lrs == [0.05, 0.05, 0.025, 0.0125]
    assert trainer.plugin_manager.get_plugin("amp").scaler.get_scale() == 512.0
    assert trainer.global_step == 4  # a skipped step still counts as a step


class StepLogs:
    """What each log point published."""

    name = "step-logs"

    def __init__(self) -> None:
        self.published: dict[int, dict[str, float]] = {}

    @hookimpl
    def log_metrics(self, metrics: dict[str, float], step: int, scope: str) -> None:
        if scope == "step":
            self.published[step] = dict(metrics)


def test_a_skipped_step_logs_no_grad_norm_and_the_epoch_mean_stays_finite() -> None:
    # The scaler skips step 2 for its infinite gradient; its norm, averaged in,
    # made the epoch's grad_norm infinite while every step taken had a finite one.
    logs = StepLogs()
    trainer = fit(
        [("amp", {"precision": "fp16", "init_scale": 1024.0}), InfGradientAt({1}), logs],
        gradient_clip_val=1e6,
        log_every_n_steps=1,
    )
    taken = {
        step: values["grad_norm"]
        for step, values in logs.published.items()
        if "grad_norm" in values
    }
    assert sorted(logs.published) == [1, 2, 3, 4]
    assert sorted(taken) == [1, 3, 4]
    assert all(math.isfinite(norm) for norm in taken.values())
    assert trainer.metrics["grad_norm"] == pytest.approx(sum(taken.values()) / 3, rel=1e-5)


def test_bf16_with_a_forced_scaler_runs_the_scaler_path() -> None:
    watch = GradientWatch()
    trainer = fit([("amp", {"precision": "bf16", "scaler": True, "init_scale": 8.0}), watch])
    assert trainer.plugin_manager.get_plugin("amp").scaler is not None
    for scaled, true in zip(watch.after_backward, watch.before_step, strict=True):
        assert scaled / true == pytest.approx(8.0, rel=2e-2)


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    options = {"precision": "fp16", "init_scale": 64.0, "growth_interval": 1}
    first = fit([("amp", options)])
    saved_scale = first.plugin_manager.get_plugin("amp").scaler.get_scale()
    assert saved_scale == 64.0 * 2**4
    path = tmp_path / "amp.ckpt"
    torch.save(first.dump_checkpoint(), path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["plugins"]["amp"]["scaler"]["scale"] == saved_scale

    seen: list[float] = []

    class ScaleAtStart:
        @hookimpl
        def on_fit_start(self, trainer: Trainer) -> None:
            seen.append(trainer.plugin_manager.get_plugin("amp").scaler.get_scale())

    resumed = fit([("amp", options), ScaleAtStart()], max_epochs=2, fit_kwargs={"ckpt_path": path})
    assert seen == [saved_scale]
    assert resumed.global_step == 8
    assert resumed.plugin_manager.get_plugin("amp").scaler.get_scale() == saved_scale * 2**4


def test_a_device_without_autocast_is_refused_not_run_in_float32() -> None:
    trainer = Trainer(plugins=[("amp", {"precision": "fp16"})], device="meta")
    train, _ = make_data(n=32)
    with pytest.raises(HookError, match=r"fp16.*meta|meta.*fp16") as info:
        trainer.fit(
            DtypeProbe(),
            train,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
    assert info.value.plugin == "amp"
    assert isinstance(info.value.__cause__, ConfigurationError)


def test_an_unknown_precision_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="precision must be one of"):
        MixedPrecision(precision="fp8")


def test_a_second_precision_plugin_is_refused_when_the_trainer_is_built() -> None:
    class OtherPrecision:
        name = "other-precision"
        exclusive_roles = ("precision",)

        @hookimpl
        def backward(self, loss: torch.Tensor) -> bool:
            loss.backward()
            return True

    with pytest.raises(
        ConfigurationError,
        match="plugins 'amp' and 'other-precision' both take the exclusive role 'precision'",
    ):
        Trainer(plugins=[("amp", {}), OtherPrecision()], device="cpu")


def test_the_evaluation_loss_of_a_plain_model_is_computed_under_autocast():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8)
    result = Trainer(plugins=[("amp", {"precision": "bf16"})], device="cpu").validate(
        model, loader, loss_fn=F.cross_entropy, metrics={"acc": accuracy}
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = F.cross_entropy(model(inputs), targets).item()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        outside = F.cross_entropy(logits, targets).item()  # bf16 arithmetic
    assert under_autocast != outside  # the case tells the two apart
    assert result["val_loss"] == pytest.approx(under_autocast, abs=1e-6)
    assert "val_acc" in result
