"""torch.compile: a model the user compiled, and the ``compile`` plugin.

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

from hooktrain import ConfigurationError, HookError, Trainer, hookimpl
from hooktrain.state import load_model_state
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


def test_a_checkpoint_with_the_wrappers_prefixed_keys_still_loads() -> None:
    # What hooktrain wrote for a compiled model before it unwrapped them.
    source = StepNet()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    prefixed = torch.compile(source, backend="eager").state_dict()
    assert all(key.startswith("_orig_mod.") for key in prefixed)
    target = StepNet()
    load_model_state(target, prefixed)
    assert same_weights(target, source)


def test_with_accelerate_a_compiled_plain_model_keeps_its_compiled_forward() -> None:
    pytest.importorskip("hooktrain_accelerate")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    trainer = fit(
        torch.compile(model, backend="eager"),
        ["accelerate"],
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert compiled_graphs() > 0
    assert trainer.module is model


def test_a_module_compiled_in_place_runs_its_forward_compiled_with_plain_keys() -> None:
    backend = RecordingBackend()
    model = StepNet()
    model.compile(backend=backend)  # torch's in-place variant: __call__ is compiled
    trainer = fit(model)
    assert backend.compiled("linear") > 0
    assert backend.compiled("cross_entropy") == 0  # the loss, outside forward, is not
    assert list(trainer.dump_checkpoint()["model"]) == list(StepNet().state_dict())


# --------------------------------------------------------------------------------
# The compile plugin
# --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "no-such-backend"}, "unknown backend 'no-such-backend'"),
        ({"backend": 3}, "backend must be a backend name or a callable"),
        ({"mode": "fastest"}, "unknown mode 'fastest'"),
        ({"backend": "eager", "mode": "max-autotune"}, "'inductor' backend only"),
        ({"fullgraph": "yes"}, "fullgraph must be True or False"),
        ({"dynamic": 1}, "dynamic must be None, True or False"),
    ],
)
def test_bad_options_are_refused_when_the_trainer_is_built(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Trainer(plugins=[("compile", options)])


def test_the_plugin_compiles_a_models_own_steps_and_keeps_the_users_module() -> None:
    backend = RecordingBackend()
    model = StepNet()
    trainer = fit(model, [("compile", {"backend": backend})])
    assert compiled_graphs() > 0
    assert backend.compiled("cross_entropy") > 0  # training_step, loss included
    assert backend.compiled("mse_loss") > 0  # validation_step
    assert trainer.module is model
    assert list(trainer.dump_checkpoint()["model"]) == list(StepNet().state_dict())


def test_the_plugin_compiles_a_plain_models_forward() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    trainer = fit(
        model,
        [("compile", {"backend": "eager"})],
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert compiled_graphs() > 0
    assert counters["frames"]["ok"] > 0
    assert trainer.module is model
    assert list(trainer.dump_checkpoint()["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]


class BreakingNet(StepNet):
    """A training step with a graph break in the middle."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        torch._dynamo.graph_break()
        return F.cross_entropy(logits, targets)


def test_fullgraph_reaches_torch_compile() -> None:
    # Without fullgraph the break splits the step into two graphs; with it, the
    # break is an error at the first step.
    fit(BreakingNet(), [("compile", {"backend": "eager"})], epochs=1)
    assert counters["stats"]["unique_graphs"] >= 2
    torch._dynamo.reset()  # else dynamo reuses the code it compiled for the same step
    with pytest.raises(torch._dynamo.exc.Unsupported):
        fit(BreakingNet(), [("compile", {"backend": "eager", "fullgraph": True})], epochs=1)


def test_compiled_training_with_the_eager_backend_matches_uncompiled_training() -> None:
    # The eager backend runs the captured graph op by op: the same arithmetic as
    # the uncompiled model, so the weights must come out identical.
    plain, compiled = StepNet(), StepNet()
    fit(plain, epochs=2)
    fit(compiled, [("compile", {"backend": "eager"})], epochs=2)
    assert compiled_graphs() > 0
    assert same_weights(plain, compiled)


def test_later_stages_reuse_the_compiled_code() -> None:
    model = StepNet()
    trainer = fit(model, [("compile", {"backend": "eager"})])
    after_fit = compiled_graphs()
    _, val = make_data(n=64, batch_size=16, seed=1)
    trainer.validate(model, val)
    # Validation already ran (compiled) inside fit: nothing new to compile.
    assert compiled_graphs() == after_fit


def test_the_plugin_refuses_a_model_the_user_compiled_already() -> None:
    with pytest.raises(HookError, match="already compiled"):
        fit(torch.compile(StepNet(), backend="eager"), [("compile", {"backend": "eager"})])


def test_under_amp_the_compiled_step_runs_in_autocast() -> None:
    pytest.importorskip("hooktrain_amp")
    dtypes: list[torch.dtype] = []

    class Recorded(StepNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            logits = self(inputs)
            dtypes.append(logits.dtype)  # runs at trace time: what the graph computes in
            return F.cross_entropy(logits, targets)

    fit(Recorded(), [("amp", {"precision": "bf16"}), ("compile", {"backend": "eager"})])
    assert compiled_graphs() > 0
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_with_accelerate_the_prepared_model_is_compiled() -> None:
    pytest.importorskip("hooktrain_accelerate")
    backend = RecordingBackend()
    model = StepNet()
    # Listed first, compile still wraps what accelerate prepared (trylast).
    trainer = fit(model, [("compile", {"backend": backend}), "accelerate"])
    assert backend.compiled("cross_entropy") > 0
    assert trainer.module is model
    assert list(trainer.dump_checkpoint()["model"]) == list(StepNet().state_dict())
