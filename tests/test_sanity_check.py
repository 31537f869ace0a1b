"""The sanity check: a few validation batches before training, kept nowhere.

A mistake that only validation meets used to raise after the first training
epoch, with nothing saved (a researcher's review lost an epoch to each of them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import ConfigurationError, Trainer, accuracy, hookimpl
from hooktrain.testing import HookRecorder, make_data, make_model


class BrokenValidationStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        # The usual slip: float targets where cross_entropy wants class indices of
        # another shape.
        return F.cross_entropy(self(batch[0]), batch[1].float().unsqueeze(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_plain(trainer: Trainer, model: nn.Module, train, val, **options) -> None:
    """fit with cross-entropy and SGD, as a plain model trains."""
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, 0.1),
        **options,
    )


def _epochs_started(**trainer_options) -> tuple[HookRecorder, Trainer]:
    recorder = HookRecorder(["on_train_epoch_start", "log_metrics"])
    trainer = Trainer(plugins=[recorder], max_epochs=2, device="cpu", **trainer_options)
    return recorder, trainer


def test_a_failing_validation_step_raises_before_any_training() -> None:
    train, val = make_data()
    model = BrokenValidationStep()
    before = [p.clone() for p in model.parameters()]
    recorder, trainer = _epochs_started()
    with pytest.raises(RuntimeError):
        trainer.fit(model, train, val)
    assert recorder.count("on_train_epoch_start") == 0
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_without_the_check_the_same_mistake_costs_an_epoch() -> None:
    train, val = make_data()
    recorder, trainer = _epochs_started(num_sanity_val_steps=0)
    with pytest.raises(RuntimeError):
        trainer.fit(BrokenValidationStep(), train, val)
    assert recorder.count("on_train_epoch_start") == 1
    assert trainer.global_step == len(train)


def test_a_validation_batch_that_does_not_unpack_is_refused_before_training() -> None:
    train, _ = make_data()
    triples = [(x, y, torch.arange(len(y))) for x, y in train]
    recorder, trainer = _epochs_started()
    with pytest.raises(ConfigurationError, match="validation_step"):
        fit_plain(trainer, make_model(), train, triples)
    assert recorder.count("on_train_epoch_start") == 0


class LogsInEveryForward:
    name = "logs_in_every_forward"

    @hookimpl
    def forward_step(self, trainer, stage):
        trainer.log(f"{stage}_forwards_seen", 1.0)  # returns None: the core steps


def _fit(num_sanity_val_steps: int) -> tuple[nn.Module, Trainer, HookRecorder]:
    # Dropout and shuffled data: a check that drew random numbers would change the
    # training that follows.
    train, val = make_data(shuffle=True)
    model = make_model(dropout=0.3)
    recorder = HookRecorder()
    trainer = Trainer(
        plugins=[recorder, LogsInEveryForward()],
        max_epochs=2,
        seed=0,
        device="cpu",
        log_every_n_steps=1,
        num_sanity_val_steps=num_sanity_val_steps,
    )
    fit_plain(trainer, model, train, val, metrics={"acc": accuracy})
    return model, trainer, recorder


def test_the_check_changes_no_training_no_metric_and_no_observer() -> None:
    checked, checked_trainer, checked_calls = _fit(2)
    unchecked, unchecked_trainer, unchecked_calls = _fit(0)
    for a, b in zip(checked.parameters(), unchecked.parameters(), strict=True):
        assert torch.equal(a, b)
    assert checked_trainer.metrics.floats() == unchecked_trainer.metrics.floats()
    assert "val_validate_forwards_seen" in checked_trainer.metrics
    published = [
        [(c.kwargs["scope"], c.kwargs["metrics"]) for c in calls.calls if c.name == "log_metrics"]
        for calls in (checked_calls, unchecked_calls)
    ]
    assert published[0] == published[1]
    observed = [c.name for c in checked_calls.calls if c.name.startswith(("on_", "log_"))]
    assert observed == [c.name for c in unchecked_calls.calls if c.name.startswith(("on_", "log_"))]
    # What the check did call, between on_fit_start and the first epoch: validation's
    # compute hooks on two batches.
    names = [c.name for c in checked_calls.calls]
    between = names[names.index("on_fit_start") + 1 : names.index("on_train_epoch_start")]
    batch = ["transfer_batch_to_device", "forward_step", "gather_for_metrics", "compute_metrics"]
    assert between == ["batch_iterator", *batch, *batch]
    names = [c.name for c in unchecked_calls.calls]
    assert names.index("on_train_epoch_start") == names.index("on_fit_start") + 1


@pytest.mark.parametrize(
    ("steps", "limit", "expected"), [(-1, None, 7), (-1, 3, 3), (5, 3, 3), (2, None, 2)]
)
def test_how_many_batches_the_check_runs(steps: int, limit: int | None, expected: int) -> None:
    train, val = make_data(n=100, batch_size=4)  # 25 validation samples: 7 batches
    recorder = HookRecorder(["forward_step"])
    trainer = Trainer(
        plugins=[recorder],
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=limit,
        num_sanity_val_steps=steps,
        device="cpu",
    )
    fit_plain(trainer, make_model(), train, val)
    forwards = [c.kwargs["stage"] for c in recorder.calls]
    # The check's validation forwards, then one training batch, then the epoch's validation.
    assert forwards[: expected + 1] == ["validate"] * expected + ["train"]
    assert forwards.count("validate") == expected + (7 if limit is None else limit)


@pytest.mark.parametrize("value", [-2, 1.5, True])
def test_a_bad_num_sanity_val_steps_is_refused(value) -> None:
    with pytest.raises(ConfigurationError, match="num_sanity_val_steps must be an integer >= -1"):
        Trainer(plugins=[], num_sanity_val_steps=value)


class SeesSanityChecking:
    name = "sees_sanity_checking"

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    @hookimpl
    def forward_step(self, trainer, stage):
        self.seen.append((stage, trainer.sanity_checking))  # returns None: the core steps


def test_compute_hooks_can_tell_the_check_from_validation() -> None:
    train, val = make_data(n=32, batch_size=16)  # 2 training batches, 1 validation batch
    plugin = SeesSanityChecking()
    trainer = Trainer(plugins=[plugin], max_epochs=1, device="cpu")
    fit_plain(trainer, make_model(), train, val)
    assert plugin.seen == [
        ("validate", True),
        ("train", False),
        ("train", False),
        ("validate", False),
    ]
    assert trainer.sanity_checking is False


def test_an_iterator_of_validation_batches_is_left_to_the_validation() -> None:
    # A generator's batches are used up when read: checking two of them took them
    # from the only validation, which then computed nothing.
    train, val = make_data(n=64, batch_size=16)  # one validation batch of 16
    results = []
    for steps in (0, 2):
        trainer = Trainer(
            plugins=[], max_epochs=1, seed=0, device="cpu", num_sanity_val_steps=steps
        )
        fit_plain(trainer, make_model(), train, iter(list(val)))
        results.append(trainer.metrics["val_loss"])
    assert results[0] == results[1]
