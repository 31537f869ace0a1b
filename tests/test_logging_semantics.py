"""Where a logged value belongs, and what evaluation computes without being told.

Each test failed on the loop before the rule it guards was put in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooktrain import ConfigurationError, Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class Publications:
    name = "publications"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict[str, float]]] = []

    @hookimpl
    def log_metrics(self, metrics, step, scope):
        self.seen.append((step, scope, dict(metrics)))


class LogsAtEpochEnds:
    """Logs a value in each stage's epoch-end hook, as an AUC computed over the
    whole epoch would be."""

    name = "logs_at_epoch_ends"

    @hookimpl
    def on_validation_epoch_end(self, trainer):
        trainer.log("auc", 0.5)

    @hookimpl
    def on_train_epoch_end(self, trainer):
        trainer.log("epoch_score", float(trainer.current_epoch))


def test_a_value_logged_at_an_epoch_end_belongs_to_that_epoch():
    publications = Publications()
    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(
        plugins=[LogsAtEpochEnds(), publications], max_epochs=2, log_every_n_steps=1, device="cpu"
    )
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, 0.1),
    )
    validations = [(step, m) for step, scope, m in publications.seen if scope == "validate"]
    epochs = [(step, m) for step, scope, m in publications.seen if scope == "epoch"]
    steps = [m for _, scope, m in publications.seen if scope == "step"]
    assert [(step, m["val_auc"]) for step, m in validations] == [(2, 0.5), (4, 0.5)]
    assert [(step, m["epoch_score"]) for step, m in epochs] == [(2, 0.0), (4, 1.0)]
    # Never published again as a training step's value.
    assert not any("val_auc" in m or "epoch_score" in m for m in steps)


def test_validate_returns_a_value_logged_at_its_epoch_end():
    _, val = make_data(n=32, batch_size=16)
    result = Trainer(plugins=[LogsAtEpochEnds()], device="cpu").validate(
        make_model(), val, loss_fn=F.cross_entropy
    )
    assert result["val_auc"] == 0.5 and "val_loss" in result


def test_validate_after_fit_uses_the_fits_loss_and_metrics():
    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu")
    model = make_model()
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, 0.1),
        metrics={"acc": accuracy},
    )
    result = trainer.validate(model, val)  # as the README writes it: no loss_fn
    assert set(result) == {"val_loss", "val_acc"}
    assert result["val_loss"] == pytest.approx(trainer.metrics["val_loss"])
    tested = trainer.test(model, val)
    assert set(tested) == {"test_loss", "test_acc"}


def test_an_evaluation_that_computes_nothing_fails_clearly():
    _, val = make_data(n=32, batch_size=16)
    with pytest.raises(ConfigurationError, match=r"validate\(\) computed no metric"):
        Trainer(plugins=[], device="cpu").validate(make_model(), val)
