"""torch.compile: a model the user compiled.

Compilation is observed through dynamo's own counters (frames converted, graphs
made) and, where it matters *what* was compiled, through a backend that records
every graph it is given and runs it unchanged (a backend is any callable taking
the graph module and example inputs, as ``torch.compile(backend=...)`` documents).
Every test starts from a reset dynamo (no cached code, zeroed counters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data

BATCHES = 3  # limit_train_batches: the tests compile, they need few steps


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def compiled_graphs() -> int:
    """Graphs dynamo handed to a backend since the last reset."""
    return counters["stats"]["unique_graphs"]


class RecordingBackend:
    """A torch.compile backend that keeps the names of the calls in every graph it
    compiles, then runs the graph as captured (what ``backend="eager"`` does)."""

    def __init__(self) -> None:
        self.graphs: list[set[str]] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(
            {
                getattr(node.target, "__name__", str(node.target))
                for node in graph.graph.nodes
                if node.op in ("call_function", "call_method", "call_module")
            }
        )
        return graph.forward

    def compiled(self, name: str) -> int:
        """How many recorded graphs call ``name``."""
        return sum(name in calls for calls in self.graphs)


class StepNet(nn.Module):
    """A model with its own steps and optimizer, as in examples/convolutional.py."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        return {"loss": F.mse_loss(self(inputs), F.one_hot(targets, 2).float())}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    model: nn.Module, plugins: list[Any] | None = None, epochs: int = 1, **fit_kwargs: Any
) -> Trainer:
    trainer = Trainer(
        plugins=plugins or [],
        max_epochs=epochs,
        seed=3,
        device="cpu",
        limit_train_batches=BATCHES,
        limit_val_batches=2,
    )
    train, val = make_data(n=64, batch_size=16, seed=1)
    trainer.fit(model, train, val, **fit_kwargs)
    return trainer


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# --------------------------------------------------------------------------------
# A model the user compiled: torch.compile(model) passed to fit
# --------------------------------------------------------------------------------


def test_a_compiled_model_with_its_own_training_step_runs_that_step_compiled() -> None:
    backend = RecordingBackend()
    fit(torch.compile(StepNet(), backend=backend))
    assert compiled_graphs() > 0
    # The loss is computed inside compiled code: the step itself was compiled, not
    # only the forward it calls (cross_entropy is only in training_step).
    assert backend.compiled("cross_entropy") > 0
    # The evaluation step too (mse_loss is only in validation_step).
    assert backend.compiled("mse_loss") > 0


def test_a_compiled_plain_model_runs_its_forward_compiled() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(torch.compile(model, backend="eager"), loss_fn=F.cross_entropy, optimizer=optimizer)
    assert compiled_graphs() > 0
    assert counters["frames"]["ok"] > 0


def test_a_compiled_models_checkpoint_has_the_plain_models_keys(tmp_path: Path) -> None:
    model = StepNet()
    trainer = fit(torch.compile(model, backend="eager"))
    assert trainer.module is model
    state = trainer.dump_checkpoint()["model"]
    assert list(state) == list(StepNet().state_dict())
    assert not any(key.startswith("_orig_mod.") for key in state)


class SaveAtEnd:
    """Writes the run's checkpoint to ``path`` when the fit ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        torch.save(trainer.dump_checkpoint(), self.path)


def test_checkpoints_of_compiled_and_plain_models_resume_into_each_other(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    uninterrupted = StepNet()
    fit(uninterrupted, epochs=2)

    # Compiled first epoch, plain second epoch.
    fit(torch.compile(StepNet(), backend="eager"), [SaveAtEnd(path)], epochs=1)
    resumed_plain = StepNet()
    fit(resumed_plain, epochs=2, ckpt_path=str(path))
    assert same_weights(resumed_plain, uninterrupted)

    # Plain first epoch, compiled second epoch.
    fit(StepNet(), [SaveAtEnd(path)], epochs=1)
    resumed_compiled = StepNet()
    fit(torch.compile(resumed_compiled, backend="eager"), epochs=2, ckpt_path=str(path))
    assert same_weights(resumed_compiled, uninterrupted)
