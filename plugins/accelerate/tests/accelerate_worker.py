"""One training run with the accelerate plugin, started by the tests under
``torchrun`` (or ``accelerate launch``) on the CPU. Each process writes what it saw
to ``<out>/rank<N>.json``.

Usage: ``python accelerate_worker.py '<json config>'``; the keys are read in
``main``. Kept free of test-only tricks: it is an ordinary user script.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class StepModel(nn.Module):
    """A model with its own training and validation steps (the Lightning style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]  # a third item, when there, is the sample's index
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OutputsStepModel(StepModel):
    """Its own validation step returns outputs and targets: the loop computes
    ``loss_fn`` and the metrics on them."""

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"outputs": self(batch[0]), "targets": batch[1]}


class ParityStepModel(StepModel):
    """Its own validation step returns ``a`` (the sample's index) for samples of
    even index and ``b`` for odd ones: with one sample a batch, processes that get
    different samples return different names."""

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        index = batch[2]
        name = "a" if int(index[0]) % 2 == 0 else "b"
        return {name: index.float().mean()}


MODELS = {"step": StepModel, "outputs": OutputsStepModel, "parity": ParityStepModel}


class LogOnOneRank:
    """Logs ``only_rank<r>`` = ``r + 4`` after every training batch, on rank ``r``
    only (a value some processes never log)."""

    name = "log-on-one-rank"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_rank == self.rank:
            trainer.log(f"only_rank{self.rank}", float(self.rank + 4))


class ScorePerProcess:
    """Logs ``score`` at the end of each validation in fit: the epoch on rank 0
    (rising), 0 elsewhere (flat). Logged outside the batches, it is each process's
    own value."""

    name = "score"

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            rising = trainer.is_global_zero
            trainer.log("score", float(trainer.current_epoch) if rising else 0.0)


class BatchCount:
    """Counts the validation batches this process evaluated, and the epochs it
    trained."""

    name = "batch-count"

    def __init__(self) -> None:
        self.validation_batches = 0
        self.epochs = 0

    @hookimpl
    def on_validation_batch_end(self) -> None:
        self.validation_batches += 1

    @hookimpl
    def on_train_epoch_start(self) -> None:
        self.epochs += 1


def indexed_val_loader(n: int, batch_size: int) -> DataLoader:
    """``n`` validation samples of the usual problem, each with its index."""
    _, val = make_data(n=4 * n)
    inputs, targets = val.dataset.tensors
    return DataLoader(TensorDataset(inputs, targets, torch.arange(n)), batch_size=batch_size)


class GatherCount:
    """Counts the evaluation samples that reach the metrics after gathering."""

    name = "gather-count"

    def __init__(self) -> None:
        self.samples = 0

    @hookimpl(wrapper=True)
    def gather_for_metrics(self) -> Any:
        result = yield
        if result is not None:
            self.samples += len(result[0])
        return result


class AllReduceCount:
    """Counts the gradient all-reduces DDP performs (one per bucket per synced
    backward; this tiny model fits one bucket), through a real DDP comm hook."""

    name = "allreduce-count"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # No annotations: DDP checks them, and under "from __future__ import
        # annotations" they would be strings.
        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
            self.calls += 1
            return default_hooks.allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)


def _compiled_graphs() -> int:
    """Graphs torch.compile made in this process (0 when dynamo never loaded)."""
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    return 0 if dynamo_utils is None else dynamo_utils.counters["stats"]["unique_graphs"]


def epoch_metrics() -> dict[str, Any]:
    """Whole-epoch torchmetrics metrics, and a batch mean for comparison."""
    from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

    return {
        "f1": MulticlassF1Score(num_classes=2, average="macro"),
        "auroc": MulticlassAUROC(num_classes=2),
        "acc": accuracy,
    }


def fit_with_epoch_metrics(config: dict[str, Any], out: Path, rank: int) -> None:
    """Three fits in this one launch: an uninterrupted one, one stopped in the middle
    of its second epoch with a checkpoint, and one resumed from that checkpoint."""

    def fit(**kwargs: Any) -> Trainer:
        counter = GatherCount()
        plugins: list[Any] = [("accelerate", dict(config.get("accelerate", {}))), counter]
        if "checkpoint" in kwargs:
            plugins.append(("checkpoint", {"dirpath": str(out / kwargs.pop("checkpoint"))}))
        trainer = Trainer(
            plugins=plugins,
            seed=0,
            max_epochs=2,
            log_every_n_steps=1,
            max_steps=kwargs.pop("max_steps", None),
        )
        train, val = make_data(n=config["n"], batch_size=config["batch_size"])
        trainer.fit(
            make_model(),
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            metrics=epoch_metrics(),
            **kwargs,
        )
        trainer.gathered_eval_samples = counter.samples  # type: ignore[attr-defined]
        return trainer

    whole = fit()
    stopped = fit(max_steps=7, checkpoint="ckpt")  # 5 steps an epoch: 2 into the second
    resumed = fit(checkpoint="ckpt", ckpt_path="last")
    report = {
        "rank": whole.global_rank,
        "world_size": whole.world_size,
        "metrics": whole.metrics.floats(),
        "gathered_eval_samples": whole.gathered_eval_samples,  # type: ignore[attr-defined]
        "weights": {k: v.tolist() for k, v in whole.module.state_dict().items()},
        "stopped_step": stopped.global_step,
        "resumed_metrics": resumed.metrics.floats(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


class Stream(torch.utils.data.IterableDataset):
    """Ten batches of 16 from a seeded generator, and no length: the trainer learns
    that the epoch (and its accumulation window) ended only when the data ends."""

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            yield (
                torch.randn(16, 8, generator=generator),
                torch.randint(0, 2, (16,), generator=generator),
            )


class ShuffledStream(torch.utils.data.IterableDataset):
    """Five batches of 16, in an order drawn from torch's global generator when the
    iteration starts; accelerate iterates it on rank 0 only and sends each process
    its batch, so only rank 0 draws."""

    def __iter__(self) -> Any:
        data = make_data(n=80, batch_size=80)[0].dataset.tensors
        order = torch.randperm(80)
        for begin in range(0, 80, 16):
            index = order[begin : begin + 16]
            yield data[0][index], data[1][index]


class SizedStream(Stream):
    def __len__(self) -> int:
        return 10


def fit_unsized_and_sized(config: dict[str, Any], out: Path, rank: int) -> None:
    """The same fit on the same batches, with and without the data's length."""
    report: dict[str, Any] = {"rank": rank}
    for name, dataset in (("unsized", Stream()), ("sized", SizedStream())):
        trainer = Trainer(
            plugins=[("accelerate", dict(config.get("accelerate", {})))],
            seed=0,
            max_epochs=2,
            accumulate_grad_batches=3,
        )
        trainer.fit(
            make_model(),
            DataLoader(dataset, batch_size=None),
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        )
        report[name] = {
            "global_step": trainer.global_step,
            "weights": {k: v.tolist() for k, v in trainer.module.state_dict().items()},
            "grads_left": [p.grad is not None for p in trainer.module.parameters()],
        }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


class SampleCount:
    """A stateful metric (the torchmetrics protocol: update, compute, reset,
    merge_state) counting the samples it saw."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.count += len(targets)

    def compute(self) -> torch.Tensor:
        return torch.tensor(float(self.count))

    def reset(self) -> None:
        self.count = 0

    def merge_state(self, other: SampleCount) -> None:
        self.count += other.count


class Identity(nn.Module):
    """Predicts its input: a sample's prediction is its index."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def unsplittable_data(config: dict[str, Any], out: Path, rank: int) -> None:
    """Predictions of 37 samples (not a multiple of 2 x the batch), a validation set
    given as a list of batches, and training data given as a list of batches."""
    report: dict[str, Any] = {"rank": rank}
    trainer = Trainer(plugins=[("accelerate", {})], seed=0)
    indices = torch.arange(37, dtype=torch.float32).unsqueeze(1)
    predictions = trainer.predict(Identity(), DataLoader(TensorDataset(indices), batch_size=4))
    report["predictions"] = predictions.squeeze(1).tolist()
    train, val = make_data(n=config["n"], batch_size=config["batch_size"])
    trainer = Trainer(plugins=[("accelerate", {})], seed=0)
    results = trainer.validate(
        make_model(), list(val), loss_fn=F.cross_entropy, metrics={"count": SampleCount()}
    )
    report["validated_count"] = results["val_count"]
    trainer = Trainer(plugins=[("accelerate", {})], seed=0)
    try:
        trainer.fit(make_model(), list(train), loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)
    except Exception as error:  # the refusal under test
        report["fit_error"] = f"{type(error).__name__}: {error}"
    # A validation set split by hand, a Subset per rank: accelerate would split each
    # share again.
    own = Subset(val.dataset, range(rank, len(val.dataset), 2))
    trainer = Trainer(plugins=[("accelerate", {})], seed=0)
    try:
        trainer.validate(make_model(), DataLoader(own, batch_size=4), loss_fn=F.cross_entropy)
    except Exception as error:  # the refusal under test
        report["split_error"] = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    config = json.loads(sys.argv[1])
    out = Path(config["out"])
    rank = int(os.environ.get("RANK", "0"))
    if config.get("epoch_metrics"):
        fit_with_epoch_metrics(config, out, rank)
        return
    if config.get("unsized"):
        fit_unsized_and_sized(config, out, rank)
        return
    if config.get("unsplittable"):
        unsplittable_data(config, out, rank)
        return
    options = dict(config.get("accelerate", {}))
    plugins: list[Any] = [("accelerate", options)]
    if config.get("tqdm"):
        bars = open(out / f"bars-rank{rank}.txt", "w")  # noqa: SIM115 - open for the whole run
        plugins.append(("tqdm", {"stream": bars, "terminal": True, "refresh_interval": 0}))
    if config.get("tensorboard"):
        plugins.append(("tensorboard", {"log_dir": str(out / f"runs-rank{rank}")}))
    if "checkpoint" in config:
        checkpoint = dict(config["checkpoint"])
        checkpoint["dirpath"] = str(out / checkpoint["dirpath"].format(rank=rank))
        plugins.append(("checkpoint", checkpoint))
    counter = GatherCount()
    plugins.append(counter)
    allreduces = AllReduceCount()
    if config.get("count_allreduce"):
        plugins.append(allreduces)
    batches = BatchCount()
    plugins.append(batches)
    if "log_on_rank" in config:
        plugins.append(LogOnOneRank(config["log_on_rank"]))
    if config.get("score"):
        plugins.append(ScorePerProcess())
    if "faults" in config:
        plugins.append(("faults", config["faults"]))
    if "compile" in config:
        plugins.append(("compile", config["compile"]))
    stopper = None
    if "early_stopping" in config:
        from hooktrain_early_stopping import EarlyStopping

        stopper = EarlyStopping(**config["early_stopping"])
        plugins.append(stopper)

    trainer = Trainer(
        plugins=plugins,
        seed=0,
        max_epochs=config.get("max_epochs", 2),
        max_steps=config.get("max_steps"),
        accumulate_grad_batches=config.get("accumulate_grad_batches", 1),
        gradient_clip_val=config.get("gradient_clip_val"),
        log_every_n_steps=1,
        check_finite_every_step=config.get("check_finite_every_step", False),
    )
    train, val = make_data(n=config.get("n", 80), batch_size=config.get("batch_size", 8))
    if config.get("train") == "shuffled stream":
        train = DataLoader(ShuffledStream(), batch_size=None)
    if "val" in config:
        val = indexed_val_loader(config["val"]["n"], config["val"]["batch_size"])
    fit_kwargs: dict[str, Any] = {"ckpt_path": config.get("ckpt_path")}
    if config.get("model") in MODELS:
        model: nn.Module = MODELS[config["model"]]()
        if config["model"] == "outputs":
            fit_kwargs.update(loss_fn=F.cross_entropy, metrics={"acc": accuracy})
    else:
        model = make_model(dropout=config.get("dropout", 0.0))
        fit_kwargs.update(
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            metrics={"acc": accuracy},
        )
    trainer.fit(model, train, val, **fit_kwargs)
    fit_batches = batches.validation_batches
    validated = trainer.validate(model, val) if config.get("validate") else None

    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "device": str(trainer.device),
        "metrics": trainer.metrics.floats(),
        "gathered_eval_samples": counter.samples,
        "gradient_allreduces": allreduces.calls,
        "weights": {k: v.tolist() for k, v in trainer.module.state_dict().items()},
        "validation_batches_in_fit": fit_batches,
        "epochs_trained": batches.epochs,
        "validate": validated,
        "compiled_graphs": _compiled_graphs(),
    }
    if stopper is not None:
        report["early_stopping"] = {
            "stopped_epoch": stopper.stopped_epoch,
            "stop_reason": stopper.stop_reason,
        }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
