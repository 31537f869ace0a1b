"""Faults users of other trainers reported, each turned into the right value.

Every test here failed on the loop before it was fixed; each names the kind of
fault it guards, since the fix covers the kind, not only the input shown.
"""

from __future__ import annotations

import random
import warnings

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)

from hooktrain import ConfigurationError, ResumeWarning, Trainer, accuracy, hookimpl
from hooktrain.rng import mark_epoch_seeded
from hooktrain.testing import HookRecorder, make_data, make_model


def sgd(lr: float = 0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


# ---------------------------------------------------------------- 1. accumulation


class GradientSeen:
    name = "gradient_seen"

    def __init__(self) -> None:
        self.grads: list[float] = []

    @hookimpl
    def on_before_optimizer_step(self, optimizer):
        self.grads.append(optimizer.param_groups[0]["params"][0].grad.item())


class Ones(IterableDataset):
    """``n`` samples of 1.0, with no length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        for _ in range(self.n):
            yield torch.ones(1), torch.zeros(1)


def _linear_without_bias() -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _double_loss(outputs, targets):
    # d/dw of 2 * w * x at x = 1: every micro-batch's gradient is 2.0.
    return (2 * outputs).sum()


@pytest.mark.parametrize("known_length", [True, False])
def test_a_short_last_accumulation_window_is_the_mean_of_what_it_holds(known_length):
    data = TensorDataset(torch.ones(6, 1), torch.zeros(6, 1)) if known_length else Ones(6)
    seen = GradientSeen()
    trainer = Trainer(plugins=[seen], accumulate_grad_batches=4, device="cpu")
    trainer.fit(
        _linear_without_bias(),
        DataLoader(data, batch_size=1),
        loss_fn=_double_loss,
        optimizer=sgd(0.0),
    )
    # Windows of 4 and 2 micro-batches: each window's gradient is the mean of its own.
    assert seen.grads == [2.0, 2.0]
    assert trainer.global_step == 2


# ---------------------------------------------------------------- 2. random streams


class Draws(Dataset):
    """Records every ``random.random()`` and NumPy draw its ``__getitem__`` makes."""

    def __init__(self, n: int, log: list[tuple[float, float]] | None) -> None:
        self.data = make_data(n=n, batch_size=n)[0].dataset
        self.log = log

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        draw = (random.random(), float(numpy.random.random()))
        if self.log is not None:
            self.log.append(draw)
        return self.data[index]


def test_validation_does_not_change_trainings_random_streams():
    logs = []
    for with_validation in (False, True):
        log: list[tuple[float, float]] = []
        train = DataLoader(Draws(16, log), batch_size=4, shuffle=True)
        val = DataLoader(Draws(8, None), batch_size=4) if with_validation else None
        model = make_model(dropout=0.3)
        Trainer(plugins=[], max_epochs=2, seed=0, device="cpu").fit(
            model, train, val, loss_fn=F.cross_entropy, optimizer=sgd()
        )
        logs.append((log, model.state_dict()))
    (without, state_without), (with_val, state_with) = logs
    assert len(without) == 32 and without == with_val
    for key, value in state_without.items():
        assert torch.equal(value, state_with[key]), key


# ---------------------------------------------------------------- 3. validated twice


def test_the_same_weights_are_not_validated_twice():
    recorder = HookRecorder(hooks=["on_validation_start", "log_metrics"])
    train, val = make_data(n=16, batch_size=16)
    trainer = Trainer(plugins=[recorder], max_epochs=2, val_every_n_steps=1, device="cpu")
    trainer.fit(make_model(), train, val, loss_fn=F.cross_entropy, optimizer=sgd())
    # One batch an epoch: the step-wise validation at each epoch's last step is the
    # epoch's validation too.
    assert recorder.count("on_validation_start") == 2
    scopes = [call.kwargs["scope"] for call in recorder.of("log_metrics")]
    assert scopes.count("validate") == 2


# ---------------------------------------------------------------- 4. plateau scheduler


class PlateauModel(nn.Module):
    def __init__(self, scheduler_class: type) -> None:
        super().__init__()
        self.net = make_model()
        self.scheduler_class = scheduler_class

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.scheduler = self.scheduler_class(optimizer)
        return [optimizer], [self.scheduler]


class RenamedPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """A plateau scheduler under another class name: still recognised as one."""


@pytest.mark.parametrize(
    "scheduler_class", [torch.optim.lr_scheduler.ReduceLROnPlateau, RenamedPlateau]
)
def test_a_plateau_scheduler_steps_only_after_validated_epochs(scheduler_class):
    train, val = make_data(n=32, batch_size=16)
    model = PlateauModel(scheduler_class)
    Trainer(plugins=[], max_epochs=4, check_val_every_n_epoch=2, device="cpu").fit(
        model, train, val
    )
    # Epochs 1 and 3 validated; the scheduler stepped after each of them only.
    assert model.scheduler.last_epoch == 2


@pytest.mark.parametrize("validation", ["no loader", "never due", "no batches"])
def test_a_plateau_scheduler_without_validation_fails_before_training(validation):
    train, val = make_data(n=32, batch_size=16)
    model = PlateauModel(torch.optim.lr_scheduler.ReduceLROnPlateau)
    before = [p.clone() for p in model.parameters()]
    options = {"limit_val_batches": 0} if validation == "no batches" else {}
    every = 1 if validation == "no batches" else 3
    trainer = Trainer(
        plugins=[], max_epochs=2, check_val_every_n_epoch=every, device="cpu", **options
    )
    with pytest.raises(ConfigurationError, match="monitors 'val_loss', a validation metric"):
        trainer.fit(model, train, None if validation == "no loader" else val)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def recorded_plateau(optimizer, given: list[float], **options):
    """A ``ReduceLROnPlateau`` that appends each value it is stepped with to ``given``
    (kept out of its state, which a resume loads)."""

    class Recorded(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, *args, **kwargs):
            given.append(float(metrics))
            return super().step(metrics, *args, **kwargs)

    return Recorded(optimizer, **options)


class ValidatedEveryTwoSteps(PlateauModel):
    """A step-wise plateau scheduler on ``val_loss``, validated every second step,
    as Lightning users configure it; records what it was given."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.given = []
        self.scheduler = recorded_plateau(optimizer, self.given)
        config = {"scheduler": self.scheduler, "interval": "step", "frequency": 2}
        config["monitor"] = "val_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


class ValidationLosses:
    def __init__(self) -> None:
        self.seen: list[float] = []

    @hookimpl
    def on_validation_end(self, trainer):
        self.seen.append(trainer.metrics["val_loss"])


def test_a_step_wise_plateau_scheduler_is_judged_on_the_validation_of_its_step():
    # It was stepped inside the optimizer step, before that step's validation: the
    # fit failed at step 2 with "monitors 'val_loss', which was never logged".
    train, val = make_data(n=96, batch_size=16)  # 6 steps an epoch
    model, losses = (
        ValidatedEveryTwoSteps(torch.optim.lr_scheduler.ReduceLROnPlateau),
        ValidationLosses(),
    )
    Trainer(plugins=[losses], max_epochs=1, val_every_n_steps=2, device="cpu").fit(
        model, train, val
    )
    assert len(losses.seen) == 3  # steps 2, 4 and 6; the epoch's end saw step 6's weights
    assert model.given == losses.seen


class EpochPlateauModel(PlateauModel):
    """An epoch-wise plateau scheduler on ``val_loss`` that records what it was given."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.given = []
        self.scheduler = recorded_plateau(optimizer, self.given, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler}


class ValidationsByEpoch:
    """The ``val_loss`` of each validation, by the epoch it ran in."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    @hookimpl
    def on_validation_end(self, trainer):
        self.seen.setdefault(trainer.current_epoch, []).append(trainer.metrics["val_loss"])


# Validated at steps 3 and 6 of a 7-step epoch, never at its end.
STEP_WISE_ONLY = {"val_every_n_steps": 3, "check_val_every_n_epoch": 100}


def test_an_epoch_wise_plateau_scheduler_counts_the_epochs_step_wise_validations():
    # Only a validation at the epoch's last step counted: with val_every_n_steps=3
    # and 7 steps an epoch the scheduler was never stepped, without a word.
    train, val = make_data(n=56, batch_size=8)
    model = EpochPlateauModel(torch.optim.lr_scheduler.ReduceLROnPlateau)
    validations = ValidationsByEpoch()
    Trainer(plugins=[validations], max_epochs=2, device="cpu", **STEP_WISE_ONLY).fit(
        model, train, val
    )
    assert [len(validations.seen[epoch]) for epoch in (0, 1)] == [2, 2]  # steps 3, 6; 9, 12
    # Once after each epoch, with the epoch's latest val_loss.
    assert model.given == [validations.seen[0][-1], validations.seen[1][-1]]


def test_a_resume_keeps_the_epochs_step_wise_validations_for_its_plateau_scheduler(tmp_path):
    train, val = make_data(n=56, batch_size=8)

    def fit(plugins, ckpt_path=None):
        model = EpochPlateauModel(torch.optim.lr_scheduler.ReduceLROnPlateau)
        trainer = Trainer(plugins=plugins, max_epochs=1, seed=0, device="cpu", **STEP_WISE_ONLY)
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return model

    uninterrupted = fit([])
    path = tmp_path / "after-validation.ckpt"
    with pytest.raises(KeyboardInterrupt):  # at the last step, before the epoch's end
        fit([CrashesAfter(path, save_at=7, crash_at=7)])
    recorder = HookRecorder(hooks=["on_validation_start"])
    resumed = fit([recorder], ckpt_path=path)
    assert recorder.count("on_validation_start") == 0  # steps 3 and 6 ran before the kill
    assert len(uninterrupted.given) == len(resumed.given) == 1
    assert resumed.given == uninterrupted.given


def test_a_checkpoint_of_an_earlier_version_keeps_its_validation_for_the_plateau(tmp_path):
    # Before the epoch kept every validation's names, a checkpoint kept those of the
    # validation at its step ("last_validation"); read no more, the resumed epoch's
    # end skipped the plateau scheduler.
    train, val = make_data(n=56, batch_size=8)
    options = {"max_epochs": 1, "seed": 0, "device": "cpu", "val_every_n_steps": 7}
    path = tmp_path / "earlier.ckpt"

    def fit(plugins, ckpt_path=None):
        model = EpochPlateauModel(torch.optim.lr_scheduler.ReduceLROnPlateau)
        Trainer(plugins=plugins, **options).fit(model, train, val, ckpt_path=ckpt_path)
        return model

    with pytest.raises(KeyboardInterrupt):  # validated at step 7, before the epoch's end
        fit([CrashesAfter(path, save_at=7, crash_at=7)])
    checkpoint = torch.load(path, weights_only=True)
    progress = checkpoint["progress"]
    progress["last_validation"] = progress.pop("epoch_validation")
    torch.save(checkpoint, path)
    assert fit([], ckpt_path=path).given == fit([]).given != []


class StepPlateauModel(nn.Module):
    """A plateau scheduler stepped every optimizer step on the training loss; it
    records what it was given, and the model records each step's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 2)
        self.losses: list[float] = []
        self.given: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.cross_entropy(self.layer(inputs), targets)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = recorded_plateau(optimizer, self.given)
        scheduler = {"scheduler": plateau, "interval": "step", "monitor": "loss"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def test_a_resume_keeps_a_step_wise_validation_for_its_epochs_end(tmp_path):
    # Validated at every epoch's last step (val_every_n_steps), saved there and
    # killed before the epoch's end: the resumed end did not know the weights had
    # been validated, and, with check_val_every_n_epoch=2, neither validated them
    # nor stepped the plateau scheduler, which the uninterrupted run did.
    train, val = make_data(n=32, batch_size=16)  # 2 steps an epoch
    options = {"max_epochs": 4, "check_val_every_n_epoch": 2, "val_every_n_steps": 2}

    def fit(plugins, ckpt_path=None):
        model = PlateauModel(torch.optim.lr_scheduler.ReduceLROnPlateau)
        trainer = Trainer(plugins=plugins, seed=0, device="cpu", **options)
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return model

    uninterrupted = fit([])
    path = tmp_path / "last-batch.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([CrashesAfter(path, save_at=2, crash_at=2)])
    recorder = HookRecorder(hooks=["on_validation_start"])
    resumed = fit([recorder], ckpt_path=path)
    assert uninterrupted.scheduler.last_epoch == resumed.scheduler.last_epoch == 4
    assert recorder.count("on_validation_start") == 3  # steps 4, 6 and 8: not 2 again


def test_a_step_wise_scheduler_monitoring_the_loss_gets_that_steps_loss():
    # The loss was set after the optimizer step: the first step failed ("never
    # logged"), and on a trainer that had fitted before, each step got the last one's.
    train, _ = make_data(n=48, batch_size=16)
    trainer = Trainer(plugins=[], max_epochs=2, device="cpu")
    trainer.fit(make_model(), train, loss_fn=F.cross_entropy, optimizer=sgd())
    model = StepPlateauModel()
    trainer.fit(model, train)
    assert len(model.given) == 6
    assert model.given == pytest.approx(model.losses)


# ---------------------------------------------------------------- 5. predictions


class Emits(nn.Module):
    """Predicts whatever tensors it was built with, one per batch."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs
        self.dummy = nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return self.outputs[batch_idx]


@pytest.mark.parametrize(
    "outputs",
    [
        [torch.zeros(1, 1), torch.zeros(1, 2)],  # widths
        [torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64)],  # dtypes
        [torch.zeros(2), torch.zeros(1, 2)],  # dimensions
    ],
    ids=["widths", "dtypes", "dimensions"],
)
def test_predictions_that_cannot_be_concatenated_come_back_as_a_list(outputs):
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)
    result = Trainer(plugins=[], device="cpu").predict(Emits(outputs), loader)
    assert isinstance(result, list) and len(result) == 2
    assert all(a is b for a, b in zip(result, outputs, strict=True))


def test_predictions_of_one_shape_are_concatenated():
    outputs = [torch.zeros(1, 2), torch.ones(3, 2)]
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)
    result = Trainer(plugins=[], device="cpu").predict(Emits(outputs), loader)
    assert torch.equal(result, torch.cat(outputs))


# ---------------------------------------------------------------- 6. max_steps mid-epoch


class EpochEnds:
    name = "epoch_ends"

    def __init__(self) -> None:
        self.ends = 0
        self.validations = 0

    @hookimpl
    def on_train_epoch_end(self):
        self.ends += 1

    @hookimpl
    def on_validation_start(self):
        self.validations += 1


class SavesAtFitEnd:
    """Keeps the checkpoint of the run as it ended, as a file."""

    name = "saves_at_fit_end"

    def __init__(self, path) -> None:
        self.path = path

    @hookimpl
    def on_fit_end(self, trainer):
        torch.save(trainer.dump_checkpoint(), self.path)


class StepLRModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(dropout=0.2)

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


def _fit_steps(max_steps, plugins, ckpt_path=None):
    train, val = make_data(n=64, batch_size=8)  # 8 steps an epoch
    model = StepLRModel()
    trainer = Trainer(plugins=plugins, max_epochs=3, max_steps=max_steps, seed=1, device="cpu")
    trainer.fit(model, train, val, loss_fn=F.cross_entropy, ckpt_path=ckpt_path)
    return trainer, model


def test_stopping_at_max_steps_mid_epoch_runs_no_epoch_end_and_resumes_exactly(tmp_path):
    ends = EpochEnds()
    path = tmp_path / "cut.ckpt"
    trainer, _ = _fit_steps(7, [ends, SavesAtFitEnd(path)])
    assert trainer.global_step == 7
    assert ends.ends == 0 and ends.validations == 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5  # no epoch-end scheduler step

    resumed_ends = EpochEnds()
    resumed, resumed_model = _fit_steps(15, [resumed_ends], ckpt_path=path)
    single, single_model = _fit_steps(15, [])
    assert resumed.global_step == single.global_step == 15
    assert resumed_ends.ends == 1  # epoch 0's end, once
    assert resumed.optimizers[0].param_groups[0]["lr"] == single.optimizers[0].param_groups[0]["lr"]
    for key, value in single_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


class WarmsUp:
    """Sets the learning rate itself at every step, as a warm-up plugin does."""

    name = "warms_up"

    @hookimpl
    def on_train_batch_start(self, trainer):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 0.01 * (trainer.global_step + 1)


@pytest.mark.parametrize("moved_by", ["nothing", "a scheduler", "a warm-up plugin"])
def test_a_resume_given_another_learning_rate_warns_that_the_checkpoints_is_kept(
    tmp_path, moved_by
):
    # The checkpoint's rate was put back by load_state_dict without a word, and
    # the run went on with it. The rates each script gave are compared, not the
    # rates a scheduler or a plugin moved them to since.
    path = tmp_path / "run.ckpt"
    plugins = [WarmsUp()] if moved_by == "a warm-up plugin" else []

    def fit(lr, saver=(), ckpt_path=None):
        def configure_optimizers():
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            if moved_by != "a scheduler":
                return optimizer
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

        model = make_model()
        model.configure_optimizers = configure_optimizers
        trainer = Trainer(plugins=[*plugins, *saver], max_epochs=2, seed=1, device="cpu")
        trainer.fit(model, make_data(n=32)[0], loss_fn=F.cross_entropy, ckpt_path=ckpt_path)
        return trainer

    saved = fit(0.05, [SavesAtFitEnd(path)])
    moved = saved.optimizers[0].param_groups[0]["lr"] != 0.05
    assert moved == (moved_by != "nothing")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        fit(0.05, ckpt_path=path)  # the same rate given: no warning
    with pytest.warns(ResumeWarning, match=r"learning rate of 0.5 for optimizer 0, .* given 0.05"):
        fit(0.5, ckpt_path=path)


def test_a_fit_ended_by_max_steps_resumes_the_epochs_mean_loss_to_the_bit(tmp_path):
    # The finite check as a fit ends read the losses since the last log point by
    # summing them, and the checkpoint saved in on_fit_end held that sum: the
    # resumed epoch grouped its float32 sums otherwise (0.43187737 for 0.43187740).
    def fit(max_steps, plugins, ckpt_path=None):
        train, _ = make_data(n=400, batch_size=2, seed=1)  # 200 steps an epoch
        trainer = Trainer(
            plugins=plugins,
            max_epochs=1,
            max_steps=max_steps,
            seed=0,
            device="cpu",
            log_every_n_steps=1000,
        )
        trainer.fit(
            make_model(dropout=0.1),
            train,
            loss_fn=F.cross_entropy,
            optimizer=sgd(0.05),
            ckpt_path=ckpt_path,
        )
        return trainer

    path = tmp_path / "cut.ckpt"
    fit(77, [SavesAtFitEnd(path)])
    resumed = fit(None, [], ckpt_path=path)
    assert resumed.metrics["loss"] == fit(None, []).metrics["loss"]


# ---------------------------------------------------------------- 7. module modes


def _frozen_norm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1))
    model[0].eval()
    return model


def test_a_module_the_user_put_in_eval_mode_stays_in_eval_mode():
    model = _frozen_norm_model()
    data = DataLoader(TensorDataset(torch.randn(16, 2) + 3, torch.randn(16, 1)), batch_size=4)
    Trainer(plugins=[], max_epochs=2, device="cpu").fit(
        model, data, data, loss_fn=F.mse_loss, optimizer=sgd(0.0)
    )
    assert torch.equal(model[0].running_mean, torch.zeros(2))
    assert model.training and not model[0].training and model[1].training


def test_evaluation_puts_back_exactly_the_modes_it_found():
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    model = _frozen_norm_model()
    before = [m.training for m in model.modules()]
    trainer = Trainer(plugins=[], device="cpu")
    trainer.validate(model, data, loss_fn=F.mse_loss)
    trainer.test(model, data, loss_fn=F.mse_loss)
    trainer.predict(model, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    assert [m.training for m in model.modules()] == before == [True, False, True]


# ---------------------------------------------------------------- 8. data order on resume


class Indexed(Dataset):
    """Returns its index as a feature, so the trained order can be read off batches;
    ``noise`` adds ``torch.randn`` in ``__getitem__`` (drawn in the worker)."""

    def __init__(self, n: int, noise: bool) -> None:
        self.n = n
        self.noise = noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        x = torch.full((2,), float(index))
        if self.noise:
            x = x + torch.randn(2)
        return x, torch.tensor(index % 2)


class SeesSamples:
    name = "sees_samples"

    def __init__(self) -> None:
        self.samples: list[int] = []

    @hookimpl
    def on_train_batch_start(self, batch):
        self.samples.extend(batch[0][:, 0].round().long().tolist())


class CrashesAfter:
    """Saves a checkpoint at ``save_at`` and raises at ``crash_at`` (global steps)."""

    name = "crashes_after"

    def __init__(self, path, save_at: int, crash_at: int) -> None:
        self.path, self.save_at, self.crash_at = path, save_at, crash_at

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step == self.save_at:
            torch.save(trainer.dump_checkpoint(), self.path)
        if trainer.global_step == self.crash_at:
            raise KeyboardInterrupt("killed")


def _loader(kind: str) -> DataLoader:
    if kind == "own generator":
        return DataLoader(
            Indexed(8, noise=False),
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
    return DataLoader(Indexed(8, noise=True), batch_size=2, shuffle=True, num_workers=2)


def _fit_shuffled(plugins, ckpt_path=None, val=None, max_epochs=3, **options) -> nn.Module:
    """A fit with dropout on 4 batches an epoch, shuffled by the loader's own
    generator: what a resume must replay exactly. :return: the trained model."""
    model = make_model(features=2, dropout=0.2)
    trainer = Trainer(plugins=plugins, max_epochs=max_epochs, seed=3, device="cpu", **options)
    trainer.fit(
        model,
        _loader("own generator"),
        val,
        loss_fn=F.cross_entropy,
        optimizer=sgd(),
        ckpt_path=ckpt_path,
    )
    return model


@pytest.mark.parametrize("kind", ["own generator", "workers with noise"])
def test_a_resumed_epoch_replays_the_interrupted_epochs_data(kind, tmp_path):
    def fit(plugins, ckpt_path=None):
        model = make_model(features=2, dropout=0.2)
        trainer = Trainer(plugins=plugins, max_epochs=3, seed=3, device="cpu")
        trainer.fit(
            model, _loader(kind), loss_fn=F.cross_entropy, optimizer=sgd(), ckpt_path=ckpt_path
        )
        return model

    whole = SeesSamples()
    uninterrupted = fit([whole])
    path = tmp_path / "mid.ckpt"
    before = SeesSamples()
    with pytest.raises(KeyboardInterrupt):
        fit([before, CrashesAfter(path, save_at=6, crash_at=7)])
    after = SeesSamples()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact resume has nothing to warn about
        resumed = fit([after], ckpt_path=path)
    assert before.samples[: 6 * 2] + after.samples == whole.samples
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def _validated_on_itself(kind: str) -> DataLoader:
    if kind == "shuffled by its own generator":
        # The validation draws its iterator's seed from the same generator: the
        # next epoch's order moved with it.
        return _loader("own generator")
    # A sampler with replacement draws its indices 32 at a time, as the epoch goes:
    # a validation in between moved the training epoch's own later batches.
    generator = torch.Generator().manual_seed(0) if "its own" in kind else None
    data = Indexed(16, noise=False)
    sampler = RandomSampler(data, replacement=True, num_samples=80, generator=generator)
    return DataLoader(data, batch_size=8, sampler=sampler)


@pytest.mark.parametrize(
    "kind",
    [
        "shuffled by its own generator",
        "drawn with replacement by the core's generator",
        "drawn with replacement by its own generator",
    ],
)
def test_validating_on_the_training_loader_changes_no_training_data_and_resumes_exactly(
    kind, tmp_path
):
    # The validation in fit put the global generators back, not the training
    # loader's own: validating on that loader (or one sharing its generator) drew
    # from them, and a resume, which does not replay those draws, trained on other
    # batches without a word.
    def fit(plugins, ckpt_path=None):
        model = make_model(features=2, dropout=0.2)
        trainer = Trainer(plugins=plugins, max_epochs=2, seed=3, device="cpu", val_every_n_steps=2)
        loader = _validated_on_itself(kind)
        trainer.fit(
            model, loader, loader, loss_fn=F.cross_entropy, optimizer=sgd(), ckpt_path=ckpt_path
        )
        return model

    whole = SeesSamples()
    uninterrupted = fit([whole])
    path = tmp_path / "mid.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([CrashesAfter(path, save_at=3, crash_at=4)])
    after = SeesSamples()
    resumed = fit([after], ckpt_path=path)
    per_step = len(whole.samples) // (8 if "shuffled" in kind else 20)
    assert after.samples == whole.samples[3 * per_step :]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # And validating changes nothing the training sees.
    unvalidated = SeesSamples()
    model = make_model(features=2, dropout=0.2)
    Trainer(plugins=[unvalidated], max_epochs=2, seed=3, device="cpu").fit(
        model, _validated_on_itself(kind), loss_fn=F.cross_entropy, optimizer=sgd()
    )
    assert unvalidated.samples == whole.samples


@pytest.mark.parametrize("kind", ["own generator", "workers with noise"])
def test_a_run_resumed_from_an_epochs_end_sees_the_next_epochs_data(kind, tmp_path):
    # The loader's own generator has moved on by an epoch's end; a fresh loader in
    # the resumed run starts where the first epoch did, unless the checkpoint says.
    def fit(plugins, max_epochs, ckpt_path=None):
        model = make_model(features=2, dropout=0.2)
        trainer = Trainer(plugins=plugins, max_epochs=max_epochs, seed=3, device="cpu")
        trainer.fit(
            model, _loader(kind), loss_fn=F.cross_entropy, optimizer=sgd(), ckpt_path=ckpt_path
        )
        return model

    whole = SeesSamples()
    uninterrupted = fit([whole], max_epochs=3)
    path = tmp_path / "end.ckpt"
    fit([SavesAtEpochEnd(path)], max_epochs=1)
    after = SeesSamples()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = fit([after], max_epochs=3, ckpt_path=path)
    assert after.samples == whole.samples[8:]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


class ReseedsLazily(Sampler):
    """Like accelerate's seedable sampler: makes its generator at its first epoch and
    reseeds it from (seed, epoch) every epoch; ``mark`` says so to hooktrain."""

    def __init__(self, n: int, mark: bool) -> None:
        self.n, self.mark, self.epoch, self.generator = n, mark, 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.generator is None:
            self.generator = torch.Generator()
            if self.mark:
                mark_epoch_seeded(self)
        self.generator.manual_seed(100 + self.epoch)
        yield from torch.randperm(self.n, generator=self.generator).tolist()


def _crash_then_resume(tmp_path, loader, resumed_loader, **resumed_options):
    """Fit 3 epochs of 4 steps saving at global step 6 (mid epoch 1) and crashing at
    7; resume from that checkpoint (with ``resumed_options`` for the Trainer):
    (uninterrupted model, resumed model)."""

    def fit(data, plugins, ckpt_path=None, **options):
        model = make_model(features=2, dropout=0.2)
        trainer = Trainer(plugins=plugins, max_epochs=3, seed=3, device="cpu", **options)
        trainer.fit(model, data(), loss_fn=F.cross_entropy, optimizer=sgd(), ckpt_path=ckpt_path)
        return model

    uninterrupted = fit(loader, [])
    path = tmp_path / "mid.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(loader, [CrashesAfter(path, save_at=6, crash_at=7)])
    return uninterrupted, fit(resumed_loader, [], ckpt_path=path, **resumed_options)


@pytest.mark.parametrize("mark", [True, False])
def test_a_sampler_made_generator_is_left_out_of_checkpoints_once_marked(mark, tmp_path):
    # Epoch 0 starts with no generator, epoch 1 with one; a resume in a fresh
    # process starts epoch 1 with none again.
    def loader():
        return DataLoader(Indexed(8, noise=False), batch_size=2, sampler=ReseedsLazily(8, mark))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uninterrupted, resumed = _crash_then_resume(tmp_path, loader, loader)
    doubts = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    if mark:
        assert doubts == []
        for key, value in uninterrupted.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), key
    else:
        assert len(doubts) == 1
        assert "0 random generator(s) now and 1 in the checkpoint" in doubts[0]


def test_a_resume_with_another_loader_warns_that_its_order_may_differ(tmp_path):
    def plain():
        return DataLoader(Indexed(8, noise=False), batch_size=2, shuffle=True)

    with pytest.warns(ResumeWarning, match=r"1 random generator\(s\) now and 0 in"):
        _crash_then_resume(tmp_path, plain, lambda: _loader("own generator"))


def test_a_resume_with_persistent_workers_warns_that_worker_randomness_differs(tmp_path):
    # The workers' random streams run on across epochs and a resume starts new
    # ones: a dataset that augments in its workers trained on other noise, silently.
    def plain():
        return DataLoader(Indexed(8, noise=False), batch_size=2, shuffle=True)

    def persistent():
        return DataLoader(
            Indexed(8, noise=False),
            batch_size=2,
            shuffle=True,
            num_workers=1,
            persistent_workers=True,
        )

    with pytest.warns(ResumeWarning, match=r"persistent_workers=True.*not in the checkpoint"):
        _crash_then_resume(tmp_path, plain, persistent)


def test_a_mid_epoch_resume_with_another_epoch_length_warns(tmp_path):
    # Another batch size resumed silently: skipping the batches already trained,
    # counted in the old split, trained some samples twice and others never.
    def loader(batch_size):
        return lambda: DataLoader(Indexed(8, noise=False), batch_size=batch_size, shuffle=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _crash_then_resume(tmp_path, loader(2), loader(4))
    messages = [str(w.message) for w in caught]
    resumes = [m for m in messages if "an epoch split otherwise" in m]
    assert len(resumes) == 1
    assert "after batch 2 of an epoch split otherwise (4 batches an epoch, now 2:" in resumes[0]
    assert not any("but yielded" in m for m in messages)


@pytest.mark.parametrize(
    ("samples", "options", "changed"),
    [
        (7, {}, "8 samples in the dataset, now 7"),  # still 4 batches of 2 an epoch
        (8, {"accumulate_grad_batches": 2}, "1 accumulate_grad_batches, now 2"),
    ],
)
def test_a_mid_epoch_resume_split_otherwise_at_the_same_length_warns(
    tmp_path, samples, options, changed
):
    # The epoch's length alone was compared: a shorter dataset reshuffles every
    # index, and another accumulation moves the windows, both without a word.
    def loader(n):
        return lambda: DataLoader(Indexed(n, noise=False), batch_size=2, shuffle=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _crash_then_resume(tmp_path, loader(8), loader(samples), **options)
    resumes = [str(w.message) for w in caught if "an epoch split otherwise" in str(w.message)]
    assert len(resumes) == 1
    assert f"after batch 2 of an epoch split otherwise ({changed}:" in resumes[0]
    harm = "optimizer steps group other batches" if options else "trains some samples twice"
    assert harm in resumes[0]


class SavesAtEpochEnd:
    name = "saves_at_epoch_end"

    def __init__(self, path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer):
        torch.save(trainer.dump_checkpoint(), self.path)


class StopsAtFitStart:
    """Saves a checkpoint in on_fit_start and stops there, as a SIGTERM arriving
    while a resume starts does: before the resumed run trains a batch."""

    name = "stops_at_fit_start"

    def __init__(self, path) -> None:
        self.path = path

    @hookimpl
    def on_fit_start(self, trainer):
        torch.manual_seed(12345)  # a plugin drawing numbers: the checkpoint must not keep them
        torch.save(trainer.dump_checkpoint(), self.path)
        raise KeyboardInterrupt("stopped before the first batch")


@pytest.mark.parametrize("cut", ["mid-epoch", "epoch end"])
def test_a_resume_stopped_before_its_first_batch_saves_the_checkpoint_it_resumed(cut, tmp_path):
    # Such a save recorded 0 batches of the epoch done, and the fresh run's random
    # state: the next resume trained the interrupted epoch's first batches again.
    fit = _fit_shuffled
    whole = SeesSamples()
    uninterrupted = fit([whole])
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    if cut == "mid-epoch":
        with pytest.raises(KeyboardInterrupt):
            fit([CrashesAfter(first, save_at=6, crash_at=7)])
    else:
        fit([SavesAtEpochEnd(first)], max_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        fit([StopsAtFitStart(second)], ckpt_path=first)
    saved, resaved = (torch.load(p, weights_only=True) for p in (first, second))
    for key in ("progress", "rng", "epoch_start_state", "next_epoch_generators", "running_means"):
        assert repr(resaved[key]) == repr(saved[key]), key
    after = SeesSamples()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = fit([after], ckpt_path=second)
    done = 6 if cut == "mid-epoch" else 4
    assert after.samples == whole.samples[done * 2 :]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


class StopsAtEpochStart:
    """Saves a checkpoint as epoch 1 starts, before its first batch, and stops."""

    name = "stops_at_epoch_start"

    def __init__(self, path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_start(self, trainer):
        if trainer.current_epoch == 1:
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("stopped as epoch 1 starts")


def test_a_resume_from_an_epochs_start_writes_that_epochs_own_state_later(tmp_path):
    # Resumed from a checkpoint with 0 batches of the epoch done, the run kept the
    # restored epoch start state pending, and its own mid-epoch checkpoint held the
    # state of the epoch before: a resume from that one trained other batches.
    fit = _fit_shuffled
    whole = SeesSamples()
    uninterrupted = fit([whole])
    start, middle = tmp_path / "start.ckpt", tmp_path / "middle.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([StopsAtEpochStart(start)])
    with pytest.raises(KeyboardInterrupt):
        fit([CrashesAfter(middle, save_at=6, crash_at=7)], ckpt_path=start)
    after = SeesSamples()
    resumed = fit([after], ckpt_path=middle)
    assert after.samples == whole.samples[6 * 2 :]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_fresh_fit_after_a_rerun_that_trained_nothing_records_its_own_split(tmp_path):
    path = tmp_path / "cut.ckpt"
    _fit_steps(7, [SavesAtFitEnd(path)])  # 8-batch epochs, stopped mid-epoch
    trainer = Trainer(plugins=[], max_epochs=3, max_steps=7, seed=1, device="cpu")
    train, val = make_data(n=64, batch_size=8)
    trainer.fit(StepLRModel(), train, val, loss_fn=F.cross_entropy, ckpt_path=path)
    assert trainer.global_step == 7  # finished already: no epoch opened
    saves = SavesAtFitEnd(tmp_path / "fresh.ckpt")
    trainer.plugin_manager.register(saves)
    trainer.max_steps = 2
    train, val = make_data(n=64, batch_size=16)  # 4-batch epochs now
    trainer.fit(StepLRModel(), train, val, loss_fn=F.cross_entropy)
    progress = torch.load(tmp_path / "fresh.ckpt", weights_only=True)["progress"]
    assert progress["epoch_batches"] == 4


class SavesAtValidationEnd:
    """Saves a checkpoint as the first validation in fit ends, then stops the run."""

    name = "saves_at_validation_end"

    def __init__(self, path) -> None:
        self.path = path

    @hookimpl
    def on_validation_end(self, trainer):
        if trainer.stage == "fit":
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("stopped after a validation")


@pytest.mark.parametrize("val_every_n_steps", [None, 2])
def test_a_checkpoint_taken_during_validation_resumes_exactly(tmp_path, val_every_n_steps):
    # It held the random state inside validation, after its shuffling loader drew a
    # seed; the run goes on from the state before it: dropout drew differently.
    def fit(plugins, ckpt_path=None):
        val = DataLoader(Indexed(8, noise=False), batch_size=2, shuffle=True)
        options = {"max_epochs": 2, "val_every_n_steps": val_every_n_steps}
        return _fit_shuffled(plugins, ckpt_path, val, **options)

    uninterrupted = fit([])
    path = tmp_path / "validated.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([SavesAtValidationEnd(path)])
    resumed = fit([], ckpt_path=path)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize(("max_epochs", "warned"), [(1, False), (2, True)])
def test_persistent_workers_are_warned_about_only_when_something_is_left_to_train(
    tmp_path, max_epochs, warned
):
    path = tmp_path / "end.ckpt"
    plain = DataLoader(Indexed(8, noise=False), batch_size=2)
    trainer = Trainer(plugins=[SavesAtEpochEnd(path)], max_epochs=1, device="cpu")
    trainer.fit(make_model(features=2), plain, loss_fn=F.cross_entropy, optimizer=sgd())
    persistent = DataLoader(
        Indexed(8, noise=False), batch_size=2, num_workers=1, persistent_workers=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(plugins=[], max_epochs=max_epochs, device="cpu").fit(
            make_model(features=2),
            persistent,
            loss_fn=F.cross_entropy,
            optimizer=sgd(),
            ckpt_path=path,
        )
    assert any("persistent_workers" in str(w.message) for w in caught) is warned


def test_a_checkpoint_at_an_epochs_last_batch_resumes_with_another_length_unwarned(tmp_path):
    # The whole epoch is skipped, whatever its split: no sample is trained twice.
    def loader(batch_size):
        return lambda: DataLoader(Indexed(8, noise=False), batch_size=batch_size, shuffle=True)

    path = tmp_path / "last-batch.ckpt"
    with pytest.raises(KeyboardInterrupt):
        model = make_model(features=2)
        Trainer(plugins=[CrashesAfter(path, save_at=4, crash_at=4)], device="cpu").fit(
            model, loader(2)(), loss_fn=F.cross_entropy, optimizer=sgd()
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(plugins=[], max_epochs=2, device="cpu").fit(
            make_model(features=2),
            loader(4)(),
            loss_fn=F.cross_entropy,
            optimizer=sgd(),
            ckpt_path=path,
        )
    assert not [w for w in caught if issubclass(w.category, ResumeWarning)]


def test_only_a_torch_generator_can_be_marked_as_reseeded_every_epoch():
    with pytest.raises(ValueError, match=r"whose \.generator is a torch\.Generator"):
        mark_epoch_seeded(ReseedsLazily(4, mark=False))  # no generator before its first epoch


# ---------------------------------------------------------------- 10. wrong len()


class Liar(IterableDataset):
    """Says it holds 2 samples, yields 1."""

    def __len__(self) -> int:
        return 2

    def __iter__(self):
        yield torch.ones(2), torch.tensor(1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_loader_whose_length_is_wrong_ends_the_epoch_not_the_fit(accumulate, tmp_path):
    epochs = EpochEnds()
    path = tmp_path / "end.ckpt"
    trainer = Trainer(
        plugins=[epochs, SavesAtFitEnd(path)],
        max_epochs=3,
        accumulate_grad_batches=accumulate,
        device="cpu",
    )
    with pytest.warns(UserWarning, match=r"said it has 2 batches \(len\) but yielded 1") as caught:
        trainer.fit(
            make_model(features=2),
            DataLoader(Liar(), batch_size=1),
            loss_fn=F.cross_entropy,
            optimizer=sgd(),
        )
    assert sum("yielded 1" in str(w.message) for w in caught) == 1  # warned once
    assert epochs.ends == 3
    assert trainer.global_step == 3  # each epoch's open window was stepped
    saved = torch.load(path, weights_only=True)
    assert saved["progress"]["epoch"] == 2 and saved["progress"]["epoch_complete"]


def test_a_checkpoint_without_the_split_records_is_judged_by_its_length():
    # Checkpoints from before epoch_samples and accumulate_grad_batches were recorded:
    # a changed length is still a split that trains some samples twice.
    from hooktrain.replay import warn_if_epoch_length_changed

    trainer = Trainer(plugins=[], device="cpu")
    trainer.train_dataloader = DataLoader(Indexed(8, noise=False), batch_size=4)
    trainer._resume_split = {"epoch_batches": 4}
    with pytest.warns(ResumeWarning, match=r"\(4 batches an epoch, now 2: .*trains some samples"):
        warn_if_epoch_length_changed(trainer, 2, 2)


class EpochMeans:
    """Every value of ``trainer.metrics`` at each training epoch's end, unread."""

    name = "epoch_means"

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    @hookimpl
    def on_train_epoch_end(self, trainer):
        self.seen.append({name: trainer.metrics.raw(name) for name in ("loss", "acc")})


@pytest.mark.parametrize("cut", [3, 5, 8, 10, 12])
def test_a_mid_epoch_resume_gives_the_epochs_means_to_the_last_bit(cut, tmp_path):
    # A checkpoint the uninterrupted run never takes used to sum the epoch's pending
    # values there, in other groups than the uninterrupted run: float32 sums that
    # differ in the last bits. 50 samples in batches of 7: the last batch holds 1.
    train = DataLoader(Indexed(50, noise=True), batch_size=7, shuffle=True)

    def fit(plugins, ckpt_path=None):
        trainer = Trainer(plugins=plugins, max_epochs=2, seed=5, device="cpu")
        trainer.fit(
            make_model(features=2),
            train,
            loss_fn=F.cross_entropy,
            optimizer=sgd(),
            metrics={"acc": accuracy},
            ckpt_path=ckpt_path,
        )

    whole = EpochMeans()
    fit([whole])
    path = tmp_path / "mid.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit([CrashesAfter(path, save_at=cut, crash_at=cut)])
    resumed = EpochMeans()
    fit([resumed], ckpt_path=path)
    # The epochs the resumed run ended: the one it continued, and any after it.
    for expected, got in zip(whole.seen[::-1], resumed.seen[::-1], strict=False):
        for name in expected:
            assert torch.equal(expected[name], got[name]), (name, expected[name], got[name])
