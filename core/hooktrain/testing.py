"""A harness for testing plugins: tiny data, a tiny model, and a hook recorder.

Also a pytest plugin (entry point ``pytest11``): it adds the fixtures
``hooktrain_run`` and ``hook_recorder``. Importing this module does not import
torch; the helpers import it when called.

Example::

    def test_my_plugin_sees_every_epoch(hooktrain_run):
        result = hooktrain_run([MyPlugin()], max_epochs=3)
        assert result.recorder.count("on_train_epoch_end") == 3
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hooktrain.markers import hookimpl

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

    from hooktrain.trainer import Trainer

__all__ = [
    "HookCall",
    "HookRecorder",
    "PluginConformance",
    "RunResult",
    "make_data",
    "make_model",
    "run",
]


def make_data(
    n: int = 128,
    features: int = 8,
    classes: int = 2,
    batch_size: int = 16,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """A learnable classification problem: ``(train_loader, val_loader)``.

    The class is a function of the features, so a small model reaches high
    accuracy within a few epochs. The validation set has ``n // 4`` samples.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    total = n + n // 4
    inputs = torch.randn(total, features, generator=generator)
    weights = torch.randn(features, classes, generator=generator)
    targets = (inputs @ weights).argmax(dim=1)
    train = TensorDataset(inputs[:n], targets[:n])
    val = TensorDataset(inputs[n:], targets[n:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=shuffle),
        DataLoader(val, batch_size=batch_size),
    )


def make_model(
    features: int = 8, classes: int = 2, hidden: int = 16, dropout: float = 0.0, seed: int = 0
) -> nn.Module:
    """A two-layer perceptron, initialised from ``seed``."""
    import torch
    from torch import nn

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        return nn.Sequential(*layers)


@dataclass(frozen=True)
class HookCall:
    """One hook call as a plugin saw it."""

    name: str
    kwargs: dict[str, Any]
    seconds_since_start: float


def _hook_names() -> list[str]:
    from hooktrain import hookspecs

    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "hooktrain_spec"))


class HookRecorder:
    """A plugin that records every hook call, with its arguments, in call order.

    It implements every hook as a ``tryfirst`` wrapper that returns what the other
    implementations returned, so it observes without changing anything. Because
    it implements every hook, the loop calls every hook through pluggy while it is
    registered (the loop's fast path is bypassed).

    :param hooks: record only these hooks (all by default).
    """

    name = "recorder"

    def __init__(self, hooks: Sequence[str] | None = None) -> None:
        self.calls: list[HookCall] = []
        self._start = time.perf_counter()
        wanted = set(hooks) if hooks is not None else None
        for hook_name in _hook_names():
            if wanted is None or hook_name in wanted:
                setattr(self, hook_name, self._make_recorder(hook_name))

    def _make_recorder(self, hook_name: str) -> Any:
        from hooktrain import hookspecs

        spec = getattr(hookspecs, hook_name)
        import inspect

        params = list(inspect.signature(spec).parameters)
        calls = self.calls
        start = self._start

        # pluggy reads argument names from the signature, so build one that
        # matches the hookspec exactly.
        keywords = ", ".join(f"{p}={p}" for p in params)
        source = (
            f"def {hook_name}({', '.join(params)}):\n"
            f"    calls.append(HookCall({hook_name!r}, dict({keywords}),"
            f" time.perf_counter() - start))\n"
            f"    return (yield)\n"
        )
        namespace: dict[str, Any] = {
            "calls": calls,
            "HookCall": HookCall,
            "time": time,
            "start": start,
        }
        exec(compile(source, f"<hooktrain recorder {hook_name}>", "exec"), namespace)
        function = namespace[hook_name]
        return hookimpl(wrapper=True, tryfirst=True)(function)

    def names(self) -> list[str]:
        """Hook names in call order."""
        return [call.name for call in self.calls]

    def count(self, hook_name: str) -> int:
        return sum(1 for call in self.calls if call.name == hook_name)

    def of(self, hook_name: str) -> list[HookCall]:
        """Every call of one hook, in order."""
        return [call for call in self.calls if call.name == hook_name]

    def __iter__(self) -> Iterator[HookCall]:
        return iter(self.calls)

    def clear(self) -> None:
        self.calls.clear()


@dataclass
class RunResult:
    """What `run` did."""

    trainer: Trainer
    model: Any
    recorder: HookRecorder | None
    result: Any = None
    calls: list[HookCall] = field(default_factory=list)


def run(
    plugins: Sequence[Any] = (),
    *,
    stage: str = "fit",
    max_epochs: int = 2,
    record: bool = True,
    model: nn.Module | None = None,
    data: tuple[Any, Any] | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> RunResult:
    """Run one stage of a tiny training with ``plugins``; finishes in well under a
    second on a CPU.

    :param plugins: the plugin list, as for ``Trainer(plugins=...)``.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    :param record: register a `HookRecorder` (after your plugins).
    :param model: default `make_model`; trained with SGD (lr 0.1) unless it defines
        ``configure_optimizers`` or ``fit_kwargs`` gives an ``optimizer``.
    :param data: ``(train_loader, val_loader)``; default `make_data`.
    :param fit_kwargs: extra keyword arguments for ``fit`` (``ckpt_path``...);
        ``metrics`` replaces the default ``{"acc": hooktrain.accuracy}``, in every stage.
    :param trainer_kwargs: passed to ``Trainer`` (``device="cpu"`` and ``seed=0``
        unless given: two runs with the same arguments are the same run, so a test
        may compare an interrupted run with an undisturbed one; ``seed=None`` gives
        each run its own shuffling).
    """
    import torch
    import torch.nn.functional as F

    from hooktrain.metrics import accuracy
    from hooktrain.trainer import Trainer

    recorder = HookRecorder() if record else None
    selected = [*plugins, recorder] if recorder is not None else list(plugins)
    trainer_kwargs.setdefault("device", "cpu")
    trainer_kwargs.setdefault("seed", 0)
    trainer = Trainer(plugins=selected, max_epochs=max_epochs, **trainer_kwargs)
    model = model if model is not None else make_model()
    train, val = data if data is not None else make_data()
    # fit_kwargs may replace the metrics; validate and test use the same ones.
    fit_kwargs = {"metrics": {"acc": accuracy}, **(fit_kwargs or {})}
    metrics = fit_kwargs["metrics"]
    result: Any = None
    if stage == "fit":
        if not callable(getattr(model, "configure_optimizers", None)):
            fit_kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.1))
        trainer.fit(model, train, val, loss_fn=F.cross_entropy, **fit_kwargs)
    elif stage == "validate":
        result = trainer.validate(model, val, loss_fn=F.cross_entropy, metrics=metrics)
    elif stage == "test":
        result = trainer.test(model, val, loss_fn=F.cross_entropy, metrics=metrics)
    elif stage == "predict":
        result = trainer.predict(model, val)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return RunResult(trainer, model, recorder, result, recorder.calls if recorder else [])


# ---------------------------------------------------------------------- pytest plugin

try:
    import pytest
except ImportError:  # the harness works without pytest; only the fixtures need it
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def hooktrain_run(tmp_path: Any, monkeypatch: Any) -> Any:
        """`run`, inside a fresh temporary working directory (so plugins that
        write files write them there)."""
        monkeypatch.chdir(tmp_path)
        return run

    @pytest.fixture
    def hook_recorder() -> HookRecorder:
        """A fresh `HookRecorder` to put in a plugin list."""
        return HookRecorder()

    # The conformance suite a plugin's tests subclass (see docs/testing-a-plugin.md).
    from hooktrain.conformance import PluginConformance
