"""Stateful metrics in ``metrics=`` (torchmetrics): whole-epoch values, checked
against scikit-learn on the same outputs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.epoch_metrics import EpochMetrics
from hooktrain.errors import ConfigurationError
from hooktrain.testing import make_data, make_model

torchmetrics = pytest.importorskip("torchmetrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

CLASSES = 5
# 412 training samples in batches of 16 (the last one holds 12); 103 validation
# samples (the last batch holds 7).
N_TRAIN = 412
BATCH = 16


def classification_metrics() -> dict[str, Any]:
    from torchmetrics.classification import (
        MulticlassAUROC,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    return {
        "f1": MulticlassF1Score(num_classes=CLASSES, average="macro"),
        "precision": MulticlassPrecision(num_classes=CLASSES, average="macro"),
        "recall": MulticlassRecall(num_classes=CLASSES, average="macro"),
        "auroc": MulticlassAUROC(num_classes=CLASSES, average="macro"),
        "acc": accuracy,  # a plain function next to them: still a batch mean
    }


def sklearn_values(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    predicted = outputs.argmax(dim=1).numpy()
    y = targets.numpy()
    return {
        "f1": sklearn_metrics.f1_score(y, predicted, average="macro"),
        "precision": sklearn_metrics.precision_score(y, predicted, average="macro"),
        "recall": sklearn_metrics.recall_score(y, predicted, average="macro"),
        "auroc": sklearn_metrics.roc_auc_score(
            y, outputs.softmax(dim=1).numpy(), multi_class="ovr", average="macro"
        ),
    }


class TrainOutputs:
    """Keeps every training batch's outputs and targets, by epoch."""

    name = "train-outputs"

    def __init__(self) -> None:
        self.epochs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer, outputs: Any) -> None:
        batches = self.epochs.setdefault(trainer.current_epoch, [])
        batches.append((outputs["outputs"].detach().clone(), outputs["targets"].clone()))

    def of(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, targets = zip(*self.epochs[epoch], strict=True)
        return torch.cat(outputs), torch.cat(targets)


def evaluate(model: torch.nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = loader.dataset.tensors
    with torch.no_grad():
        return model(inputs), targets


def fit(
    metrics: dict[str, Any],
    plugins: list[Any],
    val: Any = None,
    ckpt_path: Any = None,
    **kwargs: Any,
) -> Trainer:
    train, default_val = make_data(n=N_TRAIN, classes=CLASSES, batch_size=BATCH)
    trainer = Trainer(plugins=plugins, device="cpu", seed=0, **kwargs)
    model = make_model(classes=CLASSES)
    trainer.fit(
        model,
        train,
        default_val if val is None else val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        metrics=metrics,
        ckpt_path=ckpt_path,
    )
    return trainer


def test_whole_epoch_values_equal_scikit_learns_with_uneven_last_batches() -> None:
    metrics = classification_metrics()
    recorded = TrainOutputs()
    trainer = fit(metrics, [recorded], max_epochs=2)
    _, val = make_data(n=N_TRAIN, classes=CLASSES, batch_size=BATCH)
    assert len(val.dataset) == 103

    val_expected = sklearn_values(*evaluate(trainer.module, val))
    train_expected = sklearn_values(*recorded.of(1))  # the last epoch alone: reset between
    for name in ("f1", "precision", "recall", "auroc"):
        assert trainer.metrics[f"val_{name}"] == pytest.approx(val_expected[name], abs=1e-5)
        assert trainer.metrics[name] == pytest.approx(train_expected[name], abs=1e-5)
        # The user's objects were copied, never updated.
        assert metrics[name].update_count == 0
    # The batch mean of a mean-decomposable metric is still its whole-set value.
    outputs, targets = evaluate(trainer.module, val)
    assert trainer.metrics["val_acc"] == pytest.approx(accuracy(outputs, targets).item(), abs=1e-6)
    # A batch mean would not have matched: the last batches are uneven and F1 is not
    # a mean over samples.
    first_epoch = sklearn_values(*recorded.of(0))["f1"]
    assert first_epoch != pytest.approx(train_expected["f1"], abs=1e-5)


def test_two_validation_loaders_keep_their_own_state() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    _, val = make_data(n=N_TRAIN, classes=CLASSES, batch_size=BATCH)
    inputs, targets = val.dataset.tensors
    # Two halves of different size; the second one's labels shifted, so that its F1
    # is far from the first's.
    first = DataLoader(TensorDataset(inputs[:60], targets[:60]), batch_size=BATCH)
    second = DataLoader(TensorDataset(inputs[60:], (targets[60:] + 1) % CLASSES), batch_size=BATCH)
    trainer = fit(
        {"f1": torchmetrics.F1Score("multiclass", num_classes=CLASSES, average="macro")},
        [],
        val=[first, second],
    )
    for idx, loader in enumerate((first, second)):
        expected = sklearn_values(*evaluate(trainer.module, loader))["f1"]
        assert trainer.metrics[f"val_f1/dataloader_idx_{idx}"] == pytest.approx(expected, abs=1e-5)
    assert "val_f1" not in trainer.metrics


class MeanAbsoluteError:
    """Not a torchmetrics Metric: only update, compute and reset."""

    def __init__(self) -> None:
        self.reset()

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.total = self.total + (outputs.argmax(dim=1) - targets).abs().sum()
        self.count += len(targets)

    def compute(self) -> torch.Tensor:
        return self.total / self.count

    def reset(self) -> None:
        self.total = torch.zeros(())
        self.count = 0


def test_any_object_with_update_compute_and_reset_is_a_whole_epoch_metric() -> None:
    trainer = fit({"mae": MeanAbsoluteError()}, [])
    _, val = make_data(n=N_TRAIN, classes=CLASSES, batch_size=BATCH)
    outputs, targets = evaluate(trainer.module, val)
    expected = (outputs.argmax(dim=1) - targets).abs().float().mean()
    assert trainer.metrics["val_mae"] == pytest.approx(expected.item(), abs=1e-6)
    # validate() alone computes it the same way, from a fresh copy.
    assert trainer.validate(trainer.module, val)["val_mae"] == pytest.approx(expected.item())


def test_a_value_that_is_not_one_number_is_refused_naming_the_metric() -> None:
    per_class = torchmetrics.F1Score("multiclass", num_classes=CLASSES, average=None)
    with pytest.raises(ConfigurationError, match=r"metric 'f1' computed a tensor of shape \(5,\)"):
        fit({"f1": per_class}, [])


def test_a_metric_failing_on_a_batch_is_named_with_the_shapes_it_was_given() -> None:
    # torchmetrics' own error named neither the metric nor what it was fed.
    too_few = torchmetrics.F1Score("multiclass", num_classes=CLASSES - 2)
    with pytest.raises(Exception) as info:
        fit({"f1": too_few}, [])
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert (
        "raised by metrics={'f1': ...} given outputs of shape (16, 5) (torch.float32) "
        "and targets of shape (16,) (torch.int64)"
    ) in notes

    def wrong(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs == targets).float().mean()  # (16, 5) against (16,)

    with pytest.raises(RuntimeError) as info:
        fit({"wrong": wrong}, [])
    assert "raised by metrics={'wrong': ...}" in "\n".join(info.value.__notes__)


def test_a_collection_of_metrics_under_one_name_is_refused_naming_it() -> None:
    # MetricCollection's compute() returns a dict: it was kept as the value, and
    # reading trainer.metrics or any logger then failed with a TypeError.
    collection = torchmetrics.MetricCollection(
        {"f1": torchmetrics.F1Score("multiclass", num_classes=CLASSES)}
    )
    with pytest.raises(ConfigurationError, match=r"metrics\['cls'\] is a MetricCollection"):
        fit({"cls": collection}, [])


def test_a_metric_that_cannot_merge_is_refused_for_several_processes() -> None:
    class FullState(torchmetrics.Metric):
        full_state_update = True

        def __init__(self) -> None:
            super().__init__()
            self.add_state("n", torch.zeros(()), dist_reduce_fx="sum")

        def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
            self.n += len(targets)

        def compute(self) -> torch.Tensor:
            return self.n

    # One process never merges; two must.
    assert EpochMetrics({"n": FullState()}, torch.device("cpu"), world_size=1)
    with pytest.raises(ConfigurationError, match=r"metrics=\{'n': \.\.\.\} cannot be combined"):
        EpochMetrics({"n": FullState()}, torch.device("cpu"), world_size=2)
    with pytest.raises(ConfigurationError, match="no merge_state method"):
        EpochMetrics({"mae": MeanAbsoluteError()}, torch.device("cpu"), world_size=2)


def test_a_mid_epoch_checkpoint_holds_the_metric_states_and_resumes_exactly(tmp_path) -> None:
    pytest.importorskip("hooktrain_checkpoint")
    checkpoint = ("checkpoint", {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 5})

    def run(**kwargs: Any) -> Trainer:
        train, val = make_data(n=N_TRAIN, classes=CLASSES, batch_size=BATCH)
        trainer = Trainer(
            plugins=[checkpoint],
            device="cpu",
            seed=0,
            max_epochs=2,
            max_steps=kwargs.pop("max_steps", None),
        )
        trainer.fit(
            make_model(classes=CLASSES),
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
            metrics=classification_metrics(),
            **kwargs,
        )
        return trainer

    uninterrupted = run()
    (tmp_path / "ckpt").rename(tmp_path / "first")
    # Stop in the middle of the second epoch (26 steps an epoch).
    run(max_steps=40)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["progress"]["epoch_batches_done"] == 14
    states = saved["epoch_metrics"]
    assert not states["reduced"]  # one process: nothing combined
    assert states["updates"] == 14
    assert set(states["metrics"]) == {"f1", "precision", "recall", "auroc"}
    resumed = run(ckpt_path="last")
    for name in ("f1", "precision", "recall", "auroc", "val_f1", "val_auroc"):
        assert resumed.metrics[name] == uninterrupted.metrics[name], name


class SavesThenStops:
    """Saves a checkpoint at the first epoch's last batch (26 steps), then raises."""

    name = "saves_then_stops"

    def __init__(self, path: Any) -> None:
        self.path = path

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_step == 26:
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("killed")


def test_metrics_restored_at_an_epochs_last_batch_compute_without_torchmetrics_warning(
    tmp_path,
) -> None:
    # The resumed epoch has no batch left: its values come from the restored states
    # alone, which torchmetrics counts as never updated and would warn about.
    path = tmp_path / "last-batch.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(classification_metrics(), [SavesThenStops(path)], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = fit(classification_metrics(), [], max_epochs=1, ckpt_path=path)
    uninterrupted = fit(classification_metrics(), [], max_epochs=1)
    for name in ("f1", "auroc", "val_f1"):
        assert trainer.metrics[name] == uninterrupted.metrics[name], name


def test_a_metrics_own_warning_shows_once_as_python_shows_it() -> None:
    from torchmetrics.classification import MulticlassF1Score

    class Noisy(MulticlassF1Score):
        def compute(self):
            warnings.warn("noisy: a warning of the metric's own", UserWarning, stacklevel=1)
            return super().compute()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's: once per place in the code
        fit({"f1": Noisy(num_classes=CLASSES)}, [], max_epochs=3)
    assert sum("noisy:" in str(w.message) for w in caught) == 1


def test_importing_hooktrain_does_not_import_torchmetrics() -> None:
    code = "import sys, hooktrain, hooktrain.trainer; print('torchmetrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_accuracy_takes_class_indices_in_one_column() -> None:
    # Keras keeps sparse labels as (batch, 1); they were taken for one-hot rows and
    # argmaxed to class 0, so the accuracy was the share of class-0 labels.
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.1, 0.2, 0.7], [0.9, 0.0, 0.1]])
    labels = torch.tensor([1, 0, 2, 2])
    assert accuracy(scores, labels.unsqueeze(1)).item() == 0.75
    assert accuracy(scores, labels.unsqueeze(1).float()).item() == 0.75
    assert accuracy(scores, labels).item() == 0.75
    with pytest.raises(ValueError, match=r"targets of shape \(4, 2\) do not fit outputs"):
        accuracy(scores, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"targets of shape \(3,\)"):
        accuracy(scores, labels[:3])


def test_accuracy_of_one_unit_binary_logits_is_the_thresholded_accuracy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 1, generator=generator)  # a one-unit binary classifier
    labels = (torch.rand(200, generator=generator) < 0.5).float()
    expected = sklearn_metrics.accuracy_score(
        labels.numpy(), (logits.squeeze(1) > 0).float().numpy()
    )
    assert 0.3 < expected < 0.7  # an untrained model: far from 1.0
    # (batch, 1) targets, as binary_cross_entropy_with_logits takes them, and (batch,).
    assert accuracy(logits, labels.unsqueeze(1)).item() == pytest.approx(expected)
    assert accuracy(logits, labels).item() == pytest.approx(expected)
    assert accuracy(logits.squeeze(1), labels.long()).item() == pytest.approx(expected)
    assert accuracy(logits.squeeze(1), labels.unsqueeze(1)).item() == pytest.approx(expected)
    # Two or more columns are still scores of classes, picked by argmax.
    scores = torch.randn(200, 3, generator=generator)
    classes = torch.randint(0, 3, (200,), generator=generator)
    expected = sklearn_metrics.accuracy_score(classes.numpy(), scores.argmax(1).numpy())
    assert accuracy(scores, classes).item() == pytest.approx(expected)
    assert accuracy(scores, F.one_hot(classes, 3).float()).item() == pytest.approx(expected)
