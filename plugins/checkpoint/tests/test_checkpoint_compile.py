"""Checkpoints of compiled runs (the ``compile`` plugin, or a model the user passed
through ``torch.compile``) and of plain runs resume into each other, exactly.

The eager backend runs dynamo's captured graph op by op, so a compiled run
computes what the plain one computes: a run interrupted on one side and resumed on
the other must end bit-identical to the uninterrupted plain run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint
from torch import nn
from torch._dynamo.utils import counters

from hooktrain import HookError, Trainer, hookimpl
from hooktrain.testing import make_data

COMPILE = ("compile", {"backend": "eager"})


class Net(nn.Module):
    """Its own training step, dropout and Adam: state the resume must restore."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(
                nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Crash(Exception):
    pass


class CrashAt:
    name = "crash"

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.seen = 0

    @hookimpl
    def on_train_batch_end(self) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise Crash(f"crash after batch {self.seen}")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def fit(
    dirpath: Path,
    *extra: Any,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
    ckpt_path: str | None = None,
) -> tuple[Trainer, Net]:
    model = Net()
    trainer = Trainer(
        plugins=[ModelCheckpoint(dirpath=dirpath, every_n_train_steps=3), *extra],
        max_epochs=2,
        seed=5,
        device="cpu",
    )
    train, _ = make_data(n=96, batch_size=16, seed=2)  # 6 batches per epoch
    trainer.fit(wrap(model), train, ckpt_path=ckpt_path)
    return trainer, model


def user_compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


# (what the interrupted run uses, what the resumed run uses): plugins, wrap
PLAIN: tuple[tuple[Any, ...], Callable[[nn.Module], nn.Module]] = ((), lambda model: model)
PLUGIN = ((COMPILE,), lambda model: model)
USER = ((), user_compiled)


@pytest.mark.parametrize(
    ("first", "second"),
    [(PLUGIN, PLAIN), (PLAIN, PLUGIN), (USER, PLAIN), (PLAIN, USER)],
    ids=["plugin-then-plain", "plain-then-plugin", "user-then-plain", "plain-then-user"],
)
def test_a_run_interrupted_on_one_side_resumes_on_the_other(
    tmp_path: Path, first: Any, second: Any
) -> None:
    _, expected = fit(tmp_path / "reference")
    (first_plugins, first_wrap), (second_plugins, second_wrap) = first, second
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path / "run", *first_plugins, CrashAt(8), wrap=first_wrap)  # saved at step 6
    compiled_before = counters["stats"]["unique_graphs"]
    _, resumed = fit(tmp_path / "run", *second_plugins, wrap=second_wrap, ckpt_path="last")
    # One side of each pair ran compiled.
    assert compiled_before > 0 or counters["stats"]["unique_graphs"] > compiled_before
    for (name, value), reference in zip(
        resumed.state_dict().items(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(value, reference), f"{name} differs from the uninterrupted run"


def test_a_compiled_runs_checkpoint_file_holds_the_plain_keys(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)
    trainer = Trainer(plugins=[checkpoint, COMPILE], max_epochs=1, device="cpu")
    train, _ = make_data(n=32, batch_size=16)
    trainer.fit(Net(), train)
    checkpoint.wait()
    saved = torch.load(checkpoint.last_path, weights_only=True)
    assert list(saved["model"]) == list(Net().state_dict())
