"""hooktrain-accelerate in one process: the same results as the core alone, bf16
through the accelerator, accumulation owned by the core, and clear refusals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_accelerate import Accelerate
from torch import nn

from hooktrain import ConfigurationError, HookError, Trainer, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data, make_model, run


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps its state per process; each test starts from scratch so
    that one test's mixed precision does not leak into the next."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class DtypeProbe(nn.Module):
    """Records the dtype of the hidden activations, per mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x)
        self.seen.append((self.training, hidden.dtype))
        return self.net[2](self.net[1](hidden))


class StepProbe(DtypeProbe):
    """The probe with its own steps and optimizer."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(plugins: list[Any], model: nn.Module, **kwargs: Any) -> Trainer:
    trainer = Trainer(plugins=plugins, seed=0, max_epochs=kwargs.pop("max_epochs", 2), **kwargs)
    train, val = make_data(n=64, batch_size=16)
    if callable(getattr(model, "configure_optimizers", None)):
        trainer.fit(model, train, val)
    else:
        trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
    return trainer


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_accelerate_is_listed_as_an_installed_plugin() -> None:
    plugin = installed_plugins()["accelerate"]
    assert plugin.distribution == "hooktrain-accelerate"
    assert plugin.load() is Accelerate


@pytest.mark.parametrize("model_class", [DtypeProbe, StepProbe])
def test_one_process_trains_exactly_like_the_core_alone(model_class: type[nn.Module]) -> None:
    with_plugin, alone = model_class(), model_class()
    trainer = fit(["accelerate"], with_plugin)
    reference = fit([], alone)
    assert (trainer.world_size, trainer.global_rank, trainer.is_global_zero) == (1, 0, True)
    assert trainer.device == torch.device("cpu")
    assert_same_weights(with_plugin, alone)
    assert trainer.metrics.floats() == pytest.approx(reference.metrics.floats(), abs=1e-6)
    # The user's module is left as it was: no routing attributes remain on it.
    assert "training_step" not in with_plugin.__dict__
    assert "forward" not in with_plugin.__dict__
    assert trainer.module is with_plugin and trainer.model is not with_plugin


@pytest.mark.parametrize("model_class", [DtypeProbe, StepProbe])
def test_bf16_runs_training_and_validation_forward_in_bfloat16(
    model_class: type[DtypeProbe],
) -> None:
    model = model_class()
    fit([("accelerate", {"mixed_precision": "bf16"})], model, max_epochs=1)
    assert {dtype for training, dtype in model.seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in model.seen if not training} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_on_the_cpu_is_refused_rather_than_run_in_float32() -> None:
    with pytest.raises(HookError, match=r"fp16.*silently train in float32") as info:
        fit([("accelerate", {"mixed_precision": "fp16"})], DtypeProbe())
    assert isinstance(info.value.__cause__, ConfigurationError)


def test_a_refused_fp16_run_leaves_the_next_trainer_its_own_precision() -> None:
    # accelerate's state is the process's: refused only after the Accelerator was
    # made, the fp16 run fixed fp16 for every later one (a notebook's next cell).
    with pytest.raises(HookError, match="fp16"):
        fit([("accelerate", {"mixed_precision": "fp16"})], DtypeProbe())
    model = DtypeProbe()
    fit([("accelerate", {"mixed_precision": "bf16"})], model, max_epochs=1)
    assert {dtype for training, dtype in model.seen if training} == {torch.bfloat16}


@pytest.mark.parametrize(
    "plugins",
    [[("amp", {"precision": "bf16"}), "accelerate"], ["accelerate", ("amp", {})]],
    ids=["amp-first", "accelerate-first"],
)
def test_amp_and_accelerate_together_refuse_to_start(plugins: list[Any]) -> None:
    pytest.importorskip("hooktrain_amp")
    # Refused when the Trainer is built, before any model or data is touched.
    with pytest.raises(ConfigurationError, match=r"exclusive role 'precision'") as info:
        Trainer(plugins=plugins, device="cpu")
    message = str(info.value)
    assert "'amp'" in message and "'accelerate'" in message
    # accelerate's own hint for the role: how to get mixed precision without amp.
    assert "mixed_precision='bf16'" in message


class Unsized:
    """The batches of a loader, without its length."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


def test_a_window_ended_by_data_of_unknown_length_is_stepped_like_the_core_alone() -> None:
    # Four batches an epoch in windows of 3 and 1: the core learns that the second
    # window is complete only when the data ends, after accelerate was told the
    # window was open; its optimizer then skipped the step and the zero_grad.
    models = make_model(), make_model()
    for plugins, model in zip((["accelerate"], []), models, strict=True):
        trainer = Trainer(plugins=plugins, seed=0, max_epochs=2, accumulate_grad_batches=3)
        train, _ = make_data(n=64, batch_size=16)
        trainer.fit(
            model,
            Unsized(train),
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        assert trainer.global_step == 4
    assert_same_weights(*models)


def test_gradient_accumulation_option_becomes_the_trainers_without_double_division(
    hook_recorder,
) -> None:
    with_plugin, alone = DtypeProbe(), DtypeProbe()
    trainer = fit([("accelerate", {"gradient_accumulation_steps": 2}), hook_recorder], with_plugin)
    fit([], alone, accumulate_grad_batches=2)
    assert trainer.accumulate_grad_batches == 2
    assert hook_recorder.count("backward") == 8
    assert hook_recorder.count("optimizer_step") == 4
    assert_same_weights(with_plugin, alone)


def test_accumulation_from_the_launcher_environment(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    trainer = fit(["accelerate"], DtypeProbe(), max_epochs=1)
    assert trainer.accumulate_grad_batches == 2
    assert trainer.global_step == 2


def test_conflicting_accumulation_settings_are_refused() -> None:
    with pytest.raises(HookError, match=r"conflicts with.*accumulate_grad_batches=3"):
        fit(
            [("accelerate", {"gradient_accumulation_steps": 2})],
            DtypeProbe(),
            accumulate_grad_batches=3,
        )


def test_clipping_goes_through_the_accelerator_and_logs_the_norm() -> None:
    with_plugin, alone = DtypeProbe(), DtypeProbe()
    trainer = fit(["accelerate"], with_plugin, gradient_clip_val=0.05)
    reference = fit([], alone, gradient_clip_val=0.05)
    assert trainer.metrics["grad_norm"] == pytest.approx(reference.metrics["grad_norm"])
    assert_same_weights(with_plugin, alone)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_run_through_the_accelerator(stage: str) -> None:
    result = run(["accelerate"], stage=stage, record=False, seed=0)
    reference = run([], stage=stage, record=False, seed=0)
    if stage == "predict":
        torch.testing.assert_close(result.result, reference.result)
    else:
        assert result.result == pytest.approx(reference.result)


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="mixed_precision must be one of"):
        Accelerate(mixed_precision="bf17")
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps must be"):
        Accelerate(gradient_accumulation_steps=0)
    with pytest.raises(ConfigurationError, match="cpu must be True, False or None, got 'yes'"):
        Accelerate(cpu="yes")
    with pytest.raises(ConfigurationError, match="may not set step_scheduler_with_optimizer"):
        Accelerate(accelerator_kwargs={"step_scheduler_with_optimizer": True})


@pytest.mark.parametrize("max_steps", [8, 6], ids=["epoch end", "mid-epoch"])
def test_a_resume_with_a_sampler_generator_is_not_warned_about(tmp_path, max_steps) -> None:
    # accelerate reseeds the sampler's generator every epoch: marked as such only
    # at the first epoch's start, it was counted in a resumed run and not in the
    # checkpoint, and the run was told that its order may differ.
    pytest.importorskip("hooktrain_checkpoint")
    import warnings

    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from hooktrain import ResumeWarning

    data = TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))
    data = TensorDataset(data.tensors[0], torch.arange(32) % 2)

    def fit_from(ckpt_path: str | None, **options: Any) -> None:
        loader = DataLoader(
            data,
            batch_size=8,
            sampler=RandomSampler(data, generator=torch.Generator().manual_seed(2)),
            generator=torch.Generator().manual_seed(3),
        )
        plugins = [("checkpoint", {"dirpath": str(tmp_path)}), ("accelerate", {"cpu": True})]
        trainer = Trainer(plugins=plugins, max_epochs=3, seed=0, device="cpu", **options)
        trainer.fit(
            make_model(),
            loader,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            ckpt_path=ckpt_path,
        )

    fit_from(None, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_from("last")
    assert [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)] == []


class Noisy(torch.utils.data.Dataset):
    """Augmentation drawn in ``__getitem__``: in a worker, from that worker's stream."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((8,), float(index)) / 32 + torch.randn(8), torch.tensor(index % 2)


class SavesThenStops:
    """Saves a checkpoint at ``step`` and raises (a crash) right after."""

    def __init__(self, path: Any, step: int) -> None:
        self.path, self.step = path, step

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step:
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("crashed")


def test_a_mid_epoch_resume_with_workers_is_exact(tmp_path) -> None:
    # The skipped batches were skipped by index: the rest went to workers whose
    # random streams were not where the interrupted epoch had them, and the
    # resumed run trained on other augmentations (the core alone was exact).
    from torch.utils.data import DataLoader

    def fit_from(plugins: list[Any], ckpt_path: Any = None) -> nn.Module:
        model = make_model()
        loader = DataLoader(Noisy(), batch_size=4, shuffle=True, num_workers=2)
        trainer = Trainer(plugins=[*plugins, ("accelerate", {"cpu": True})], max_epochs=2, seed=0)
        trainer.fit(
            model,
            loader,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            ckpt_path=ckpt_path,
        )
        return model

    uninterrupted = fit_from([])
    path = tmp_path / "mid.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_from([SavesThenStops(path, step=11)])  # 3 batches into the second epoch
    resumed = fit_from([], ckpt_path=path)
    for (name, x), y in zip(
        uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name


def test_a_loader_split_already_is_refused_before_training() -> None:
    # accelerate split it again: on 2 processes each trained on 8 of 32 samples.
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    train, val = make_data(n=32, batch_size=8)
    for split in (
        DataLoader(train.dataset, batch_size=8, sampler=DistributedSampler(train.dataset, 2, 0)),
        DataLoader(
            train.dataset,
            batch_sampler=BatchSampler(DistributedSampler(train.dataset, 2, 0), 8, False),
        ),
    ):
        model = make_model()
        before = [p.clone() for p in model.parameters()]
        trainer = Trainer(plugins=[("accelerate", {"cpu": True})], max_epochs=1, seed=0)
        with pytest.raises(HookError, match="a dataloader has a DistributedSampler"):
            trainer.fit(
                model,
                split,
                val,
                loss_fn=F.cross_entropy,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            )
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # One that splits nothing (a single-process script's) is no harm.
    whole = DataLoader(train.dataset, batch_size=8, sampler=DistributedSampler(train.dataset, 1, 0))
    Trainer(plugins=[("accelerate", {"cpu": True})], max_epochs=1, seed=0).fit(
        make_model(), whole, loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
