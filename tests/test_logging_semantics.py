"""Where a logged value belongs, and what evaluation computes without being told.

Each test failed on the loop before the rule it guards was put in.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from hooktrain import ConfigurationError, Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model

#: What every fit here trains with.
SGD_FIT = {"loss_fn": F.cross_entropy, "optimizer": lambda p: torch.optim.SGD(p, 0.1)}


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
    trainer.fit(make_model(), train, val, **SGD_FIT)
    validations = [(step, m) for step, scope, m in publications.seen if scope == "validate"]
    epochs = [(step, m) for step, scope, m in publications.seen if scope == "epoch"]
    steps = [m for _, scope, m in publications.seen if scope == "step"]
    assert [(step, m["val_auc"]) for step, m in validations] == [(2, 0.5), (4, 0.5)]
    assert [(step, m["epoch_score"]) for step, m in epochs] == [(2, 0.0), (4, 1.0)]
    # Never published again as a training step's value.
    assert not any("val_auc" in m or "epoch_score" in m for m in steps)


class LogsAtSteps:
    """Logs ``rare`` = the global step after the optimizer steps in ``steps``."""

    name = "logs_at_steps"

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    @hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step in self.steps:
            trainer.log("rare", float(trainer.global_step))


def test_a_value_pending_at_an_epochs_end_is_not_published_as_the_next_epochs_step():
    # Logged at step 11, after epoch 0's last log point (10): the epoch's end
    # replaced the value with its mean (9.0), which step 15 then published as a
    # training step's value of epoch 1.
    publications = Publications()
    train, _ = make_data(n=256, batch_size=8)
    trainer = Trainer(
        plugins=[LogsAtSteps({7, 11, 19}), publications],
        max_epochs=2,
        limit_train_batches=12,
        log_every_n_steps=5,
        device="cpu",
    )
    trainer.fit(make_model(), train, **SGD_FIT)
    steps = [
        (step, m["rare"]) for step, scope, m in publications.seen if scope == "step" and "rare" in m
    ]
    epochs = [(step, m["rare"]) for step, scope, m in publications.seen if scope == "epoch"]
    assert steps == [(10, 7.0), (20, 19.0)]
    assert epochs == [(12, 9.0), (24, 19.0)]


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


def test_an_evaluations_own_loss_fn_and_metrics_are_for_that_call_alone():
    # validate(loss_fn=...) replaced the fit's for every later call: a test() after
    # it reported the other loss as test_loss, where the docs promise the fit's.
    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu")
    model = make_model()
    trainer.fit(model, train, val, metrics={"acc": accuracy}, **SGD_FIT)
    before = trainer.test(model, val)
    other = trainer.validate(model, val, loss_fn=F.multi_margin_loss, metrics={"top1": accuracy})
    assert set(other) == {"val_loss", "val_top1"}
    assert other["val_loss"] != pytest.approx(before["test_loss"])
    assert trainer.test(model, val) == pytest.approx(before)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_a_seeded_evaluation_leaves_the_global_generators_as_it_found_them(stage):
    # Each evaluation reseeded them with the trainer's seed and left them there: the
    # members of an ensemble built in a loop after validate() had the same weights.
    _, val = make_data(n=32, batch_size=16)
    model = make_model()
    trainer = Trainer(plugins=[], device="cpu", seed=0)
    torch.manual_seed(5)
    expected = torch.randn(3)
    torch.manual_seed(5)
    getattr(trainer, stage)(
        model, val, **({} if stage == "predict" else {"loss_fn": F.cross_entropy})
    )
    assert torch.equal(torch.randn(3), expected)


class StepReturns(torch.nn.Module):
    """A plain model whose ``validation_step`` returns what the test gives it."""

    def __init__(self, make_value) -> None:
        super().__init__()
        self.net = make_model()
        self.make_value = make_value

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        return self.make_value(self(inputs), targets)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_validation_step_returning_a_loss_per_sample_is_refused(as_dict):
    # reduction="none" gave a value per sample, summed into the mean as one: a
    # val_loss batch-size times too large, or a shape error at the end with uneven
    # batches. In a dict it was left out, and validate() asked for a loss.
    _, val = make_data(n=32, batch_size=16)

    def per_sample(out, y):
        loss = F.cross_entropy(out, y, reduction="none")
        return {"loss": loss} if as_dict else loss

    with pytest.raises(
        ConfigurationError, match=r"validation_step returned a loss of shape \(\d+,\)"
    ):
        Trainer(plugins=[], device="cpu").validate(StepReturns(per_sample), val)


def test_a_validation_step_returning_its_loss_as_a_number_gives_val_loss():
    # loss.item() was left out of the metrics: fit warned that validation_step
    # "returned nothing" and validate() raised for a missing loss.
    _, val = make_data(n=48, batch_size=16)
    model = StepReturns(lambda out, y: F.cross_entropy(out, y).item())
    as_number = Trainer(plugins=[], device="cpu").validate(model, val)
    model.make_value = F.cross_entropy
    as_tensor = Trainer(plugins=[], device="cpu").validate(model, val)
    assert set(as_number) == {"val_loss"}
    assert as_number["val_loss"] == pytest.approx(float(as_tensor["val_loss"]), rel=1e-6)


@pytest.mark.parametrize("as_dict", [False, True])
def test_an_evaluation_step_returning_its_loss_as_a_string_is_refused_at_its_first_batch(
    as_dict,
):
    train, val = make_data(n=32, batch_size=16)
    batches = []

    class Counts:
        @hookimpl
        def on_validation_batch_start(self, batch_idx):
            batches.append(batch_idx)

    def formatted(out, y):
        text = f"{F.cross_entropy(out, y).item():.3f}"
        return {"loss": text} if as_dict else text

    trainer = Trainer(plugins=[Counts()], device="cpu", max_epochs=2)
    with pytest.raises(ConfigurationError, match=r"validation_step returned its loss as the str"):
        trainer.fit(StepReturns(formatted), train, val, **SGD_FIT)
    assert batches == [0]


def test_what_an_evaluation_step_returns_for_plugins_reaches_them_and_no_metric():
    # A tuple (or any object) is for the batch-end hooks, not a metric: refusing it
    # broke steps that log their values and hand predictions to a plugin.
    _, val = make_data(n=32, batch_size=16)
    received = []

    class Collects:
        @hookimpl
        def on_validation_batch_end(self, trainer, outputs):
            received.append(outputs)
            trainer.log("acc", 0.5)

    model = StepReturns(lambda out, y: (out.argmax(1), y))
    result = Trainer(plugins=[Collects()], device="cpu").validate(model, val)
    assert result == {"val_acc": 0.5}
    assert received and all(type(r) is tuple and len(r) == 2 for r in received)


def test_numpy_scalars_can_be_logged():
    np = pytest.importorskip("numpy")

    class LogsNumpy:
        @hookimpl
        def on_validation_batch_end(self, trainer):
            trainer.log("np", np.float32(0.25))

    _, val = make_data(n=32, batch_size=16)
    result = Trainer(plugins=[LogsNumpy()], device="cpu").validate(
        make_model(), val, loss_fn=F.cross_entropy
    )
    assert result["val_np"] == 0.25


def test_numpy_scalars_a_validation_step_returns_are_metrics():
    np = pytest.importorskip("numpy")
    _, val = make_data(n=32, batch_size=16)
    model = StepReturns(
        lambda out, y: {"f32": np.float32(0.5), "i64": np.int64(2), "f": np.float64(0.25)}
    )
    result = Trainer(plugins=[], device="cpu").validate(model, val)
    assert result == {"val_f32": 0.5, "val_i64": 2.0, "val_f": 0.25}


@pytest.mark.parametrize("fn", [lambda o, t: (o.argmax(1) == t).float(), lambda o, t: [0.5]])
def test_a_metric_function_that_returns_no_single_number_is_refused(fn):
    # Without .mean() the per-sample tensor was summed into the epoch's mean as if
    # it were one value: an "accuracy" of 17.4.
    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=r"metric 'acc' returned "):
        trainer.fit(make_model(), train, val, metrics={"acc": fn}, **SGD_FIT)
    assert trainer.global_step <= 1  # at the first batch


@pytest.mark.parametrize("name", ["loss", "val_acc", "test_acc"])
def test_a_metric_name_the_loop_uses_itself_is_refused_before_training(name):
    # metrics={"loss": accuracy} averaged the accuracy into the training loss and
    # made val_loss the accuracy; "val_acc" wrote the training value under it.
    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=f"metrics name {name!r}"):
        trainer.fit(make_model(), train, val, metrics={name: accuracy}, **SGD_FIT)
    assert trainer.global_step == 0


def test_logging_loss_in_a_training_batch_is_refused_at_the_first_step():
    # trainer.log("loss", data_loss) beside a returned data_loss + l2 made the
    # epoch's "loss" the mean of the two, without a word.
    class LogsPartOfItsLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            data_loss = F.cross_entropy(self.layer(x), y)
            trainer.log("loss", data_loss)
            return data_loss + 0.1 * self.layer.weight.square().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu")
    with pytest.raises(ConfigurationError, match=r"trainer.log\('loss', ...\) in a training batch"):
        trainer.fit(LogsPartOfItsLoss(), train, val)
    assert trainer.global_step == 0


def test_an_evaluation_that_computes_nothing_fails_clearly():
    _, val = make_data(n=32, batch_size=16)
    with pytest.raises(ConfigurationError, match=r"validate\(\) computed no metric"):
        Trainer(plugins=[], device="cpu").validate(make_model(), val)


@pytest.mark.parametrize(
    ("stage", "option"), [("validate", "limit_val_batches"), ("test", "limit_test_batches")]
)
def test_an_evaluation_limited_to_no_batch_says_so(stage, option):
    # It said "pass loss_fn=...", to a call that had passed one.
    _, val = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[], device="cpu", **{option: 0})
    with pytest.raises(ConfigurationError, match=rf"{stage}\(\) ran on no batch: {option}=0"):
        getattr(trainer, stage)(make_model(), val, loss_fn=F.cross_entropy)


# ---------------------------------------------------------------- batch weights


class TimeMajor(torch.nn.Module):
    """Reads ``(T, B, F)`` batches and averages over time: outputs ``(B, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = make_model(features=2)

    def forward(self, x):
        return self.head(x.mean(dim=0))


def _time_major_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randn(5, 3, 2, generator=generator)  # T=5, three sequences
    targets = torch.tensor([0, 1, 1])
    return [(sequences[:, :2], targets[:2]), (sequences[:, 2:], targets[2:])]


def test_training_and_evaluation_weigh_a_batch_alike():
    batches = _time_major_batches()
    trainer = Trainer(plugins=[], device="cpu")
    model = TimeMajor()
    trainer.fit(
        model, batches, batches, loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, 0)
    )
    with torch.no_grad():
        per_sample = F.cross_entropy(
            model(torch.cat([x for x, _ in batches], dim=1)),
            torch.cat([y for _, y in batches]),
            reduction="none",
        )
    # Weighted by sequences (2 and 1), not by time steps (5 and 5).
    assert trainer.metrics["loss"] == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert trainer.metrics["loss"] == pytest.approx(trainer.metrics["val_loss"], rel=1e-6)


class SaysItsBatchSize(torch.nn.Module):
    """A step whose batch no rule can read: it says how many samples it held, in a
    mapping of type ``kind``."""

    def __init__(self, kind: type = dict) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.kind = kind

    def training_step(self, batch, batch_idx):
        values = batch["values"]
        loss = self.weight * sum(values) / len(values)
        return self.kind([("loss", loss), ("batch_size", len(values))])

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


# An OrderedDict's "batch_size" was ignored: only a plain dict was read for it.
@pytest.mark.parametrize("kind", [dict, OrderedDict])
def test_a_step_can_say_its_batch_size(kind):
    batches = [{"values": [1.0, 2.0, 3.0]}, {"values": [10.0]}]
    trainer = Trainer(plugins=[], device="cpu")
    trainer.fit(SaysItsBatchSize(kind), batches, [batches])  # one validation loader
    # (1 + 2 + 3 + 10) / 4 samples, not the mean of the two batch means (6.0).
    assert trainer.metrics["loss"] == pytest.approx(4.0)
    assert trainer.metrics["val_loss"] == pytest.approx(4.0)
    assert "val_batch_size" not in trainer.metrics


class TimeMajorTagger(torch.nn.Module):
    """Tags every time step of ``(T, B, F)`` sequences: outputs ``(T, B, C)``, so
    its steps say the batch size, which no rule can read off these outputs."""

    def forward(self, x):
        return self.head(x)

    def __init__(self, kind: type = dict) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 3)
        self.kind = kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        outputs = self(x)
        loss = F.cross_entropy(outputs.reshape(-1, 3), y.reshape(-1))
        pairs = [("loss", loss), ("outputs", outputs), ("targets", y), ("batch_size", x.shape[1])]
        return self.kind(pairs)

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("kind", [dict, OrderedDict])
def test_metrics_weigh_a_batch_by_the_size_its_step_says(kind):
    # The step's loss was weighted by its "batch_size" (3 and 1 sequences), the
    # metrics= values by the outputs' first dimension (T = 4 for both): the
    # epoch's accuracy was the plain mean of the two batches' accuracies.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 2, generator=generator)
    y = torch.randint(0, 3, (4, 4), generator=generator)
    batches = [(x[:, :3], y[:, :3]), (x[:, 3:], y[:, 3:])]
    torch.manual_seed(0)
    model = TimeMajorTagger(kind)
    trainer = Trainer(plugins=[], device="cpu")
    trainer.fit(model, batches, batches, metrics={"acc": accuracy})
    with torch.no_grad():
        by_hand = (model(x).argmax(dim=-1) == y).float().mean().item()
    first = accuracy(model(batches[0][0]), batches[0][1]).item()
    second = accuracy(model(batches[1][0]), batches[1][1]).item()
    assert by_hand != pytest.approx((first + second) / 2)  # the data tells them apart
    assert trainer.metrics["acc"] == pytest.approx(by_hand, rel=1e-6)
    assert trainer.metrics["val_acc"] == pytest.approx(by_hand, rel=1e-6)
    assert trainer.validate(model, batches, metrics={"acc": accuracy})["val_acc"] == (
        pytest.approx(by_hand, rel=1e-6)
    )


class GathersAsItIs:
    """A distributed plugin's gather_for_metrics where every process holds the
    whole evaluation set (as fsdp's does): the outputs are every sample's already."""

    name = "gathers_as_it_is"

    @hookimpl
    def gather_for_metrics(self, outputs, targets):
        return outputs, targets


def test_gathered_outputs_keep_the_weight_the_step_said():
    # Gathered outputs weighed their own first dimension: T = 4 for both batches of
    # time-major outputs, where the step said 3 and 1 sequences.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 2, generator=generator)
    y = torch.randint(0, 3, (4, 4), generator=generator)
    batches = [(x[:, :3], y[:, :3]), (x[:, 3:], y[:, 3:])]
    torch.manual_seed(0)
    model = TimeMajorTagger()
    trainer = Trainer(plugins=[GathersAsItIs()], device="cpu")
    result = trainer.validate(model, batches, metrics={"acc": accuracy})
    with torch.no_grad():
        by_hand = (model(x).argmax(dim=-1) == y).float().mean().item()
    assert result["val_acc"] == pytest.approx(by_hand, rel=1e-6)


class DictOutputs(torch.nn.Module):
    """Reads ``(T, B, F)`` sequences and returns its scores ``(B, C)`` in a dict,
    as models of many libraries do, without saying a batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(x.mean(dim=0))
        return {"loss": F.cross_entropy(logits, y), "outputs": {"logits": logits}, "targets": y}

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_outputs_in_a_dict_weigh_their_first_dimension_not_the_batchs():
    # The batch's first tensor is time-major (T = 1, then 8), the scores (6, then
    # 2 sequences) sit in a dict: the batches weighed T, and the epoch's accuracy
    # was 0.07 where 0.5 of the sequences were right.
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(1, 6, 2, generator=generator), torch.randint(0, 3, (6,), generator=generator)),
        (torch.randn(8, 2, 2, generator=generator), torch.randint(0, 3, (2,), generator=generator)),
    ]
    torch.manual_seed(0)
    model = DictOutputs()

    def acc(outputs, targets):
        return accuracy(outputs["logits"], targets)

    trainer = Trainer(plugins=[], device="cpu")
    trainer.fit(model, batches, batches, metrics={"acc": acc})
    with torch.no_grad():
        correct = [(model.head(x.mean(dim=0)).argmax(dim=-1) == y).float() for x, y in batches]
        losses = [
            F.cross_entropy(model.head(x.mean(dim=0)), y, reduction="none") for x, y in batches
        ]
    by_hand = torch.cat(correct).mean().item()
    batch_means = sum(c.mean().item() for c in correct) / 2
    assert by_hand != pytest.approx(batch_means)  # the data tells the weights apart
    for prefix in ("", "val_"):
        assert trainer.metrics[f"{prefix}acc"] == pytest.approx(by_hand, rel=1e-6)
        assert trainer.metrics[f"{prefix}loss"] == pytest.approx(torch.cat(losses).mean().item())


def test_outputs_in_a_list_of_one_per_sample_keep_the_batch_weight() -> None:
    # A detection model's outputs: per image, its boxes, of ragged shapes. The
    # batch weighed the first image's box count (1), not its 8 images.
    sizes = (8, 8, 4)
    batches = [(torch.randn(n, 4), torch.randn(n)) for n in sizes]

    class Detector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            boxes = [torch.zeros(i % 3 + 1, 4) for i in range(len(x))]
            # A loss that tells the batches apart: its batch's index.
            return {"loss": torch.tensor(float(batch_idx)), "outputs": boxes, "targets": y}

    by_size = sum(i * n for i, n in enumerate(sizes)) / sum(sizes)
    assert by_size != pytest.approx(1.0)  # the plain mean of 0, 1 and 2
    results = Trainer(plugins=[], device="cpu").validate(Detector(), batches)
    assert results["val_loss"] == pytest.approx(by_size)
    # torchvision's collation, a tuple of images and a tuple of targets, has no
    # first dimension to read: the list's length is the only count there is.
    images = [tuple(torch.randn(3, 5, 5) for _ in range(n)) for n in sizes]
    per_image = [(x, tuple(torch.zeros(1) for _ in x)) for x in images]
    results = Trainer(plugins=[], device="cpu").validate(Detector(), per_image)
    assert results["val_loss"] == pytest.approx(by_size)


def test_a_step_that_takes_its_batch_apart_keeps_the_batch_weight() -> None:
    # The batch is sized as it arrives: a step that pops its inputs out of a dict
    # batch must still weigh 4, 4 and 2 in the epoch's means, not 1 each.
    torch.manual_seed(0)
    sizes = (4, 4, 2)
    batches = [{"x": torch.randn(n, 3), "y": torch.randint(0, 2, (n,))} for n in sizes]
    seen: list[float] = []

    class Consuming(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch.pop("x"), batch.pop("y")
            loss = F.cross_entropy(self.layer(x), y)
            trainer.log("inside", loss)
            seen.append(loss.item())
            return loss

    trainer = Trainer(plugins=[], device="cpu")
    trainer.fit(
        Consuming(),
        [dict(batch) for batch in batches],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
    )
    weighted = sum(loss * n for loss, n in zip(seen, sizes, strict=True)) / sum(sizes)
    assert trainer.metrics["loss"] == pytest.approx(weighted, rel=1e-6)
    assert trainer.metrics["inside"] == pytest.approx(weighted, rel=1e-6)


class TwoInputs(torch.nn.Module):
    """Takes batches whose tensors sit one level down, in dicts: ``{"inputs": {"a",
    "b"}, "targets": {"cls"}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(1, 2)

    def _loss(self, batch):
        (a, b), y = batch["inputs"].values(), batch["targets"]["cls"]
        return F.cross_entropy(self.a(a) + self.b(b), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        return self._loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_batch_whose_tensors_are_in_nested_dicts_weighs_its_samples() -> None:
    # Only the batch's top level was read: these weighed 1 each, and the epoch's
    # means were plain means over batches.
    torch.manual_seed(0)
    sizes = (6, 6, 1)
    batches = []
    for n in sizes:
        a, b, y = torch.randn(n, 3), torch.randn(n, 1), torch.randint(0, 2, (n,))
        batches.append({"inputs": {"a": a, "b": b}, "targets": {"cls": y}})
    model = TwoInputs()
    with torch.no_grad():
        losses = [model._loss(batch).item() for batch in batches]
    weighted = sum(loss * n for loss, n in zip(losses, sizes, strict=True)) / sum(sizes)
    assert weighted != pytest.approx(sum(losses) / len(losses))  # the data tells them apart
    trainer = Trainer(plugins=[], device="cpu")
    trainer.fit(model, batches, batches)
    assert trainer.metrics["loss"] == pytest.approx(weighted, rel=1e-6)
    assert trainer.metrics["val_loss"] == pytest.approx(weighted, rel=1e-6)


def test_tuples_and_lists_inside_a_batch_are_not_taken_for_its_fields() -> None:
    # They may hold one tensor per sample: a first search of them weighed a batch
    # of waveforms by the first one's length (16000), of images by their channels.
    from hooktrain.batches import batch_size

    waveforms = [torch.zeros(16000), torch.zeros(12000)]
    assert batch_size((waveforms, ["yes", "no"])) == 1
    assert batch_size((tuple(waveforms), ({"label": 1}, {"label": 0}))) == 1
    assert batch_size({"ids": [[1] * 512] * 32, "text": ["a"] * 32}) == 1
    # This level's tensor, then the dicts inside, come first.
    assert batch_size((waveforms, torch.zeros(2))) == 2
    assert batch_size(({"x": torch.zeros(3, 7)}, ["a", "b", "c"])) == 3


def test_writing_into_trainer_metrics_points_to_trainer_log():
    from hooktrain.metrics import Metrics

    metrics = Metrics()
    with pytest.raises(TypeError, match=r"read-only: log 'val_loss' with trainer\.log\('val_loss'"):
        metrics["val_loss"] = 0.0
    assert "val_loss" not in metrics


class LogsBatchIndex:
    name = "logs_batch_index"

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl
    def on_train_batch_end(self, trainer, batch, batch_idx):
        self.sizes.append(len(batch[1]))
        trainer.log("index", float(batch_idx))


@pytest.mark.parametrize("val_every_n_steps", [None, 1])
def test_a_value_logged_after_a_step_wise_validation_weighs_by_the_training_batch(
    val_every_n_steps,
):
    # 40 training samples in batches of 16: sizes 16, 16, 8. The validation set (10
    # samples, one batch of 10) ran inside each step with val_every_n_steps=1, and
    # the training batch's size must survive it.
    train, val = make_data(n=40, batch_size=16, shuffle=False)
    logger = LogsBatchIndex()
    trainer = Trainer(
        plugins=[logger], max_epochs=1, val_every_n_steps=val_every_n_steps, device="cpu"
    )
    trainer.fit(make_model(), train, val, **SGD_FIT)
    assert logger.sizes == [16, 16, 8]
    assert trainer.metrics["index"] == pytest.approx((0 * 16 + 1 * 16 + 2 * 8) / 40)


class LogsInValidationBatches:
    """Logs the mean of each validation batch's inputs, as a model's
    ``validation_step`` calling ``trainer.log`` would."""

    name = "logs_in_validation_batches"

    @hookimpl
    def on_validation_batch_end(self, trainer, batch):
        trainer.log("mean_input", batch[0].mean())


def test_a_value_logged_in_validation_is_never_published_as_a_training_step():
    # It was added to the names the next training log point publishes: loggers
    # got val_mean_input as a "step" value at a step where no validation ran, and
    # a validate() before fit leaked it into the fit's first step.
    publications = Publications()
    train, val = make_data(n=48, batch_size=16)
    trainer = Trainer(
        plugins=[LogsInValidationBatches(), publications],
        max_epochs=2,
        log_every_n_steps=1,
        device="cpu",
    )
    trainer.validate(make_model(), val, loss_fn=F.cross_entropy)
    trainer.fit(make_model(), train, val, **SGD_FIT)
    validations = [step for step, scope, m in publications.seen if "val_mean_input" in m]
    assert validations == [0, 3, 6]
    assert [scope for _, scope, m in publications.seen if "val_mean_input" in m] == ["validate"] * 3
    steps = [step for step, scope, _ in publications.seen if scope == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_value_logged_in_validation_is_kept_per_dataloader():
    # With two loaders it was pooled into one val_mean_input, where the values a
    # step returns are kept apart with /dataloader_idx_<i>.
    zeros = [(torch.zeros(5, 8), torch.zeros(5, dtype=torch.long))] * 2
    ones = [(torch.ones(5, 8), torch.zeros(5, dtype=torch.long))] * 6
    result = Trainer(plugins=[LogsInValidationBatches()], device="cpu").validate(
        make_model(), [zeros, ones], loss_fn=F.cross_entropy
    )
    assert result["val_mean_input/dataloader_idx_0"] == 0.0
    assert result["val_mean_input/dataloader_idx_1"] == 1.0
    assert "val_mean_input" not in result


class ReturnsPrefixedNames(torch.nn.Module):
    """A Lightning-style validation_step whose dict already names its values
    ``val_...``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.layer(x)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        outputs = self(inputs)
        return {
            "loss": F.cross_entropy(outputs, targets),
            "val_acc": accuracy(outputs, targets),
            "val_loss_sum": F.cross_entropy(outputs, targets, reduction="sum"),
        }


def test_a_returned_name_with_the_stage_prefix_keeps_it_as_a_logged_one_does():
    # A returned "val_acc" became "val_val_acc", while trainer.log("val_acc", ...)
    # kept "val_acc": a monitor of "val_acc" then found nothing.
    val = make_data()[1]
    result = Trainer(plugins=[], device="cpu").validate(ReturnsPrefixedNames(), val)
    assert sorted(result) == ["val_acc", "val_loss", "val_loss_sum"]
    two = Trainer(plugins=[], device="cpu").validate(ReturnsPrefixedNames(), [val, val])
    assert "val_acc/dataloader_idx_1" in two and "val_val_acc/dataloader_idx_1" not in two


class BranchesOnLoader(torch.nn.Module):
    """Lightning's steps with ``dataloader_idx``: a default in one, required in the
    others."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.seen: list[tuple[str, int]] = []

    def forward(self, x):
        return self.layer(x)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("validate", dataloader_idx))
        return F.cross_entropy(self(batch[0]), batch[1]) * (1 + dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx):
        self.seen.append(("test", dataloader_idx))
        return F.cross_entropy(self(batch[0]), batch[1])

    def predict_step(self, batch, batch_idx, *, dataloader_idx):
        self.seen.append(("predict", dataloader_idx))
        return self(batch[0])


def test_a_step_that_takes_dataloader_idx_is_given_the_loaders_index():
    # It was never passed: a step branching on it ran loader 0's code on every
    # loader, and a step that required it failed with a bare TypeError.
    val = make_data()[1]
    one_batch = [next(iter(val))]
    model, trainer = BranchesOnLoader(), Trainer(plugins=[], device="cpu")
    result = trainer.validate(model, [one_batch, one_batch])
    assert model.seen == [("validate", 0), ("validate", 1)]
    assert result["val_loss/dataloader_idx_1"] == pytest.approx(
        2 * result["val_loss/dataloader_idx_0"]
    )
    model.seen.clear()
    trainer.test(model, one_batch)
    trainer.predict(model, [one_batch, one_batch])
    assert model.seen == [("test", 0), ("predict", 0), ("predict", 1)]
    assert trainer.dataloader_idx == 0


class LogsUntilTurnedOff:
    name = "logs_until_turned_off"
    on = True

    @hookimpl
    def on_train_batch_end(self, trainer, batch_idx):
        if self.on:
            trainer.log("index", float(batch_idx))


def test_a_value_logged_after_a_fits_last_log_point_does_not_reach_the_next_fit():
    # Logged at step 3 of 3 with a log point every 2 steps, it waited for a
    # publication; the next fit on the same trainer published its stale value.
    publications = Publications()
    logs = LogsUntilTurnedOff()
    train, _ = make_data(n=48, batch_size=16)
    trainer = Trainer(plugins=[logs, publications], log_every_n_steps=2, device="cpu")
    trainer.fit(make_model(), train, **SGD_FIT)
    logs.on = False
    del publications.seen[:]
    trainer.fit(make_model(), train, **SGD_FIT)
    assert [(step, scope, sorted(m)) for step, scope, m in publications.seen] == [
        (2, "step", ["loss"]),
        (3, "epoch", ["loss"]),
    ]


def test_a_float64_models_metrics_are_the_same_whether_a_logger_listens_or_not():
    # Reading the values for a logger stacked them as float32 and kept the rounded
    # values: early stopping and checkpoints saw other numbers once a logger was added.
    train, val = make_data(n=48, batch_size=16)

    def fit(plugins):
        torch.manual_seed(0)
        trainer = Trainer(plugins=plugins, max_epochs=1, device="cpu")
        data = _as_double(train), _as_double(val)
        trainer.fit(make_model().double(), *data, metrics={"acc": accuracy}, **SGD_FIT)
        return trainer

    publications = Publications()
    listened, alone = fit([publications]), fit([])
    assert listened.metrics["val_loss"] == alone.metrics["val_loss"]
    assert listened.metrics["loss"] == alone.metrics["loss"]
    published = {scope: values for _, scope, values in publications.seen}
    assert published["validate"]["val_loss"] == alone.metrics["val_loss"]
    assert published["epoch"]["loss"] == alone.metrics["loss"]


def _as_double(loader):
    return [(inputs.double(), targets) for inputs, targets in loader]


@pytest.mark.parametrize("batch_size", [0, -2, True, "32", torch.ones(2)])
def test_a_weight_that_is_no_positive_number_is_refused(batch_size):
    # batch_size=0 was taken as "not given" and weighed the value by the batch.
    class LogsWithWeight:
        @hookimpl
        def on_train_batch_end(self, trainer):
            trainer.log("x", 1.0, batch_size=batch_size)

    train, _ = make_data(n=32, batch_size=16)
    trainer = Trainer(plugins=[LogsWithWeight()], max_epochs=1, device="cpu")
    with pytest.raises(
        Exception,
        match=r"needs a positive number \(or a one-element tensor\) as the value's weight",
    ) as info:
        trainer.fit(make_model(), train, **SGD_FIT)
    assert isinstance(info.value.__cause__ or info.value, ConfigurationError)


def test_a_tensor_weight_is_taken_as_it_is():
    # A token count as a tensor: refused by the first check of batch_size.
    class LogsWithTokenCounts:
        @hookimpl
        def on_train_batch_end(self, trainer, batch_idx):
            trainer.log("per_token", float(batch_idx), batch_size=torch.tensor(batch_idx + 1))

    train, _ = make_data(n=48, batch_size=16)
    trainer = Trainer(plugins=[LogsWithTokenCounts()], max_epochs=1, device="cpu")
    trainer.fit(make_model(), train, **SGD_FIT)
    # (0*1 + 1*2 + 2*3) / (1 + 2 + 3)
    assert trainer.metrics["per_token"] == pytest.approx(8 / 6)


class LogsBeforeEachStep:
    """Logs the step about to be taken, as the core logs a clipped gradient norm."""

    @hookimpl
    def on_before_optimizer_step(self, trainer):
        trainer.log("step_value", float(trainer.global_step + 1), batch_size=1)


@pytest.mark.parametrize(("log_every_n_steps", "published"), [(2, [2]), (3, [3])])
def test_a_value_logged_in_the_step_of_a_window_an_unsized_iterator_left_open_counts(
    log_every_n_steps, published
):
    # A loader without len() ending inside an accumulation window: the window is
    # stepped after the loop, with no log point of its own (docs/hook-order.md), and
    # a value logged during that step was left out of the epoch's mean.
    batches = list(make_data(n=160, batch_size=16)[0])  # 10 micro-batches

    class Unsized:
        def __iter__(self):
            return iter(batches)

    publications = Publications()
    trainer = Trainer(
        plugins=[LogsBeforeEachStep(), publications],
        max_epochs=1,
        accumulate_grad_batches=3,
        log_every_n_steps=log_every_n_steps,
        device="cpu",
    )
    trainer.fit(make_model(), Unsized(), **SGD_FIT)
    assert trainer.global_step == 4  # windows of 3, 3, 3 and 1
    steps = [(step, m["step_value"]) for step, scope, m in publications.seen if scope == "step"]
    assert steps == [(step, float(step)) for step in published]  # not the window's step 4
    (epoch,) = [m for _, scope, m in publications.seen if scope == "epoch"]
    assert epoch["step_value"] == pytest.approx((1 + 2 + 3 + 4) / 4)


class LogsOutsideBatches:
    name = "logs_outside_batches"

    @hookimpl
    def setup(self, trainer, stage):
        trainer.log("from_setup", 1.0)

    @hookimpl
    def on_fit_start(self, trainer):
        trainer.log("from_fit_start", 2.0)

    @hookimpl
    def on_train_epoch_start(self, trainer):
        trainer.log("from_epoch_start", 10.0 + trainer.current_epoch)


@pytest.mark.parametrize("log_every_n_steps", [1, 50])
def test_values_logged_outside_batches_go_out_at_a_log_point_and_with_their_epoch(
    log_every_n_steps,
):
    # Before, no logger got them when no log point came before the epoch's end
    # (setup's value was even dropped from trainer.metrics).
    publications = Publications()
    train = make_data(n=32, batch_size=16)[0]
    trainer = Trainer(
        plugins=[LogsOutsideBatches(), publications],
        max_epochs=2,
        log_every_n_steps=log_every_n_steps,
        device="cpu",
    )
    trainer.fit(make_model(), train, **SGD_FIT)
    seen = {
        name: [(step, scope, m[name]) for step, scope, m in publications.seen if name in m]
        for name in ("from_setup", "from_fit_start", "from_epoch_start")
    }
    # With the epoch they were logged in, as a value logged in batches is (as its
    # mean), and at the first log point before that: a logger that keeps only some
    # step publications (TensorBoard's own log_every_n_steps) still gets them.
    if log_every_n_steps == 1:
        assert seen == {
            "from_setup": [(1, "step", 1.0), (2, "epoch", 1.0)],
            "from_fit_start": [(1, "step", 2.0), (2, "epoch", 2.0)],
            "from_epoch_start": [
                (1, "step", 10.0),
                (2, "epoch", 10.0),
                (3, "step", 11.0),
                (4, "epoch", 11.0),
            ],
        }
    else:  # no log point
        assert seen == {
            "from_setup": [(2, "epoch", 1.0)],
            "from_fit_start": [(2, "epoch", 2.0)],
            "from_epoch_start": [(2, "epoch", 10.0), (4, "epoch", 11.0)],
        }
    assert trainer.metrics["from_setup"] == 1.0


def test_a_value_logged_outside_batches_that_no_publication_takes_is_warned_about():
    # max_steps stops the second epoch before any log point: its on_train_epoch_start
    # value reaches no logger, and must not go without a word.
    publications = Publications()
    train = make_data(n=32, batch_size=16)[0]  # 2 steps an epoch
    trainer = Trainer(
        plugins=[LogsOutsideBatches(), publications],
        max_epochs=2,
        max_steps=3,
        log_every_n_steps=50,
        device="cpu",
    )
    with pytest.warns(
        UserWarning, match=r"'from_epoch_start', logged with trainer.log, reached no"
    ):
        trainer.fit(make_model(), train, **SGD_FIT)
    assert [m["from_epoch_start"] for _, _, m in publications.seen] == [10.0]
    assert trainer.metrics["from_epoch_start"] == 11.0
