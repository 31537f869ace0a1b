"""The monitor plugin, through real runs of the trainer (hooktrain.testing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_monitor import Monitor
from torch import nn

from hooktrain import Trainer, hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain.testing import HookRecorder, make_data, make_model

# make_data(n=128, batch_size=16): 8 training batches an epoch, 2 validation batches.
BATCH = 16


class ManualClock:
    """A clock the test advances itself: one second per training batch, 100 per
    validation batch, so that throughput is a function of counts only."""

    name = "manual-clock"

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    @hookimpl
    def on_train_batch_start(self) -> None:
        self.now += 1.0

    @hookimpl
    def on_validation_batch_start(self) -> None:
        self.now += 100.0


class GradNormAfterStep:
    """The reference: the gradients' total norm read in ``on_before_zero_grad`` (the
    optimizer step leaves ``.grad`` as it was), at every step."""

    name = "grad-norm-reference"

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    @hookimpl
    def on_before_zero_grad(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]
        self.norms[trainer.global_step + 1] = torch.cat(grads).norm().item()


def published(recorder: HookRecorder, scope: str = "step") -> list[tuple[int, dict[str, float]]]:
    return [
        (call.kwargs["step"], dict(call.kwargs["metrics"]))
        for call in recorder.of("log_metrics")
        if call.kwargs["scope"] == scope
    ]


def test_every_publication_holds_lr_grad_norm_and_throughput_as_floats(hooktrain_run) -> None:
    clock = ManualClock()
    reference = GradNormAfterStep()
    result = hooktrain_run(
        [clock, reference, Monitor(clock=clock)],
        max_epochs=2,
        log_every_n_steps=2,
    )
    steps = published(result.recorder)
    assert [step for step, _ in steps] == [2, 4, 6, 8, 10, 12, 14, 16]
    for step, metrics in steps:
        for name in ("lr", "grad_norm", "samples_per_sec", "steps_per_sec"):
            assert type(metrics[name]) is float, name
        assert metrics["lr"] == 0.1  # hooktrain.testing.run's SGD
        assert metrics["grad_norm"] == pytest.approx(reference.norms[step], rel=1e-6)
        # Two batches of 16 in two (manual) seconds; the 200 seconds of validation
        # between steps 8 and 10 are not training time.
        assert metrics["samples_per_sec"] == 2 * BATCH / 2.0
        assert metrics["steps_per_sec"] == 1.0
        assert "max_memory_allocated" not in metrics  # the CPU
    # Logged inside batches, the values also join the epoch's means: at the end,
    # trainer.metrics holds the mean of the last epoch's publications.
    last_epoch = [reference.norms[step] for step in (10, 12, 14, 16)]
    mean = sum(last_epoch) / len(last_epoch)
    assert result.trainer.metrics["grad_norm"] == pytest.approx(mean, rel=1e-6)
    (_, epoch_end) = published(result.recorder, "epoch")[-1]
    assert epoch_end["grad_norm"] == pytest.approx(mean, rel=1e-6)


def test_the_gradient_norm_is_taken_before_clipping_and_over_a_whole_window(
    hooktrain_run,
) -> None:
    reference = GradNormAfterStep()
    result = hooktrain_run(
        [Monitor()],
        max_epochs=1,
        log_every_n_steps=2,
        accumulate_grad_batches=2,  # 8 batches: 4 steps, windows of 2
        gradient_clip_val=1e-4,
    )
    steps = published(result.recorder)
    assert [step for step, _ in steps] == [2, 4]
    for _, metrics in steps:
        # Clipped gradients would have a norm of at most 1e-4.
        assert metrics["grad_norm"] > 1e-2
        assert metrics["samples_per_sec"] > 0 and metrics["steps_per_sec"] > 0
    # Without clipping, the window's accumulated gradients are the reference's.
    unclipped = hooktrain_run(
        [reference, Monitor()], max_epochs=1, log_every_n_steps=2, accumulate_grad_batches=2
    )
    for step, metrics in published(unclipped.recorder):
        assert metrics["grad_norm"] == pytest.approx(reference.norms[step], rel=1e-6)


def test_the_gradient_norm_is_computed_only_at_published_steps(hooktrain_run, monkeypatch) -> None:
    calls = []
    original = torch.nn.utils.get_total_norm

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    hooktrain_run([Monitor()], max_epochs=2, log_every_n_steps=4)
    assert len(calls) == 4  # steps 4, 8, 12 and 16 of 16


class TwoOptimizers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first, second = self.body[0], self.body[2]
        return [
            torch.optim.SGD(
                [{"params": first.parameters(), "lr": 0.1}, {"params": second.parameters()}],
                lr=0.05,
            ),
            torch.optim.Adam(self.head.parameters(), lr=0.001),
        ]


def test_several_optimizers_and_groups_are_each_published() -> None:
    recorder = HookRecorder(hooks=["log_metrics"])
    trainer = Trainer(plugins=[Monitor(), recorder], device="cpu", log_every_n_steps=4)
    train, _ = make_data()
    trainer.fit(TwoOptimizers(), train)
    _, metrics = published(recorder)[-1]
    assert metrics["lr"] == 0.1
    assert metrics["lr/0/0"] == 0.1
    assert metrics["lr/0/1"] == 0.05
    assert metrics["lr/1/0"] == 0.001
    # One total norm over both optimizers' parameters.
    assert metrics["grad_norm"] > 0


def test_a_scheduled_learning_rate_is_published_as_it_is_at_each_step(hooktrain_run) -> None:
    model = make_model()

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1.0)

    recorder = HookRecorder(hooks=["log_metrics"])
    trainer = Trainer(plugins=[Monitor(), recorder], device="cpu", log_every_n_steps=1)
    train, _ = make_data(n=64)  # 4 steps

    class Scheduled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> dict[str, Any]:
            opt = optimizer(self.parameters())
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer.fit(Scheduled(), train)
    # The rate each step trained with, as Lightning's LearningRateMonitor and the
    # TensorBoard plugin's lr/group_0 give it; read at the step's end, it was the
    # next step's rate (0.5, 0.25, ...).
    assert [m["lr"] for _, m in published(recorder)] == [1.0, 0.5, 0.25, 0.125]


class GradNormEveryStep:
    """The reference for an epoch's mean: every step's norm before clipping, and
    its batch's size."""

    name = "grad-norm-every-step"

    def __init__(self) -> None:
        self.norms: list[tuple[float, int]] = []

    @hookimpl
    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]
        self.norms.append((torch.cat(grads).norm().item(), trainer._batch_size))


def test_with_clipping_the_epoch_mean_gradient_norm_counts_each_step_once(hooktrain_run) -> None:
    # The core logs the clipping norm at every step; the monitor logged the same
    # norm again at publish steps, which the epoch's mean then counted twice.
    reference = GradNormEveryStep()
    train, val = make_data(n=120)  # batches of 16, the last of 8
    result = hooktrain_run(
        [reference, Monitor()],
        max_epochs=1,
        log_every_n_steps=2,
        gradient_clip_val=1e9,
        data=(train, val),
    )
    assert [size for _, size in reference.norms] == [16] * 7 + [8]
    # Every step once, the short last batch's too: not weighted by batch size.
    mean = sum(n for n, _ in reference.norms) / 8
    assert result.trainer.metrics["grad_norm"] == pytest.approx(mean, rel=1e-6)
    for step, metrics in published(result.recorder):
        assert metrics["grad_norm"] == pytest.approx(reference.norms[step - 1][0], rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "yes"}, "monitor: lr must be True or False"),
        ({"clock": 3.0}, "monitor: clock must be callable"),
    ],
)
def test_bad_options_are_refused_when_the_trainer_is_built(options, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Trainer(plugins=[("monitor", options)])


def test_selected_by_name_it_reaches_every_logger(hooktrain_run) -> None:
    result = hooktrain_run(["monitor"], max_epochs=1, log_every_n_steps=4)
    (_, first), (_, second) = published(result.recorder)
    assert {"lr", "grad_norm", "samples_per_sec", "steps_per_sec"} <= set(first) & set(second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is published on CUDA only")
def test_peak_memory_is_published_in_bytes_on_cuda(hooktrain_run) -> None:
    result = hooktrain_run(["monitor"], max_epochs=1, log_every_n_steps=4, device="cuda")
    for _, metrics in published(result.recorder):
        assert metrics["max_memory_allocated"] == float(int(metrics["max_memory_allocated"]))
        # At least the model's parameters are allocated on the device.
        parameters = sum(p.numel() * p.element_size() for p in result.model.parameters())
        assert metrics["max_memory_allocated"] >= parameters


def test_sharded_gradients_give_the_whole_norm(hooktrain_run) -> None:
    # Under fsdp the gradients are DTensors, and a norm over them comes in parts; the
    # monitor must publish the whole norm, the number a plain run publishes.
    pytest.importorskip("hooktrain_fsdp")
    options = {"max_epochs": 1, "log_every_n_steps": 2, "seed": 0}  # the same batches
    plain = published(hooktrain_run([Monitor()], **options).recorder)
    sharded = published(hooktrain_run([Monitor(), "fsdp"], **options).recorder)
    assert [step for step, _ in sharded] == [step for step, _ in plain] == [2, 4, 6, 8]
    for (_, whole), (_, parts) in zip(plain, sharded, strict=True):
        assert type(parts["grad_norm"]) is float
        assert parts["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


class TimeMajor(nn.Module):
    """A plain model of (T=20, B=4, F=3) batches: 4 samples, not 20."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


class SaysItsBatchSize(nn.Module):
    """Batches of 8 token lists, no tensor among them: the step says the size."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 4)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        ids = torch.tensor(batch["ids"])
        return {"loss": self.emb(ids).pow(2).mean(), "batch_size": len(batch["ids"])}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TakesItsBatchApart(nn.Module):
    """A step that pops its batch's tensors: sized after the step, it held none."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch.pop("x")), batch.pop("y"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("case", ["time-major", "step says", "step takes it apart"])
def test_samples_are_counted_as_the_epochs_means_weigh_them(case: str) -> None:
    # The monitor counted the batch's first tensor's first dimension: 20 samples a
    # time-major batch of 4 sequences, and 1 for a batch of token lists.
    clock = ManualClock()
    recorder = HookRecorder()
    trainer = Trainer(
        plugins=[clock, Monitor(clock=clock), recorder], log_every_n_steps=2, device="cpu"
    )
    if case == "time-major":
        data = [(torch.randn(20, 4, 3), torch.randn(4, 1)) for _ in range(4)]
        trainer.fit(
            TimeMajor(),
            data,
            loss_fn=F.mse_loss,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        )
        samples = 4
    elif case == "step says":
        trainer.fit(SaysItsBatchSize(), [{"ids": [[1, 2, 3]] * 8}] * 4)
        samples = 8
    else:
        batches = [{"x": torch.randn(16, 3), "y": torch.randn(16, 1)} for _ in range(4)]
        trainer.fit(TakesItsBatchApart(), batches)
        samples = 16
    steps = published(recorder)
    assert [step for step, _ in steps] == [2, 4]
    # One manual second a batch.
    assert all(metrics["samples_per_sec"] == samples for _, metrics in steps)
