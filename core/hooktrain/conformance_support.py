"""The parts `hooktrain.conformance` checks are built from: the training job they all
run, the host-sync counter, the neighbour plugin of the order check, and weight
comparison. Importing this module does not import torch."""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
import os
import signal
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.markers import hookimpl

if TYPE_CHECKING:
    import pytest
    import torch

    from hooktrain.testing import HookRecorder
    from hooktrain.trainer import Trainer

__all__ = [
    "CONVERSIONS",
    "HostSyncCounter",
    "InjectedHookError",
    "Neighbour",
    "StateAtFitEnd",
    "TrainingJob",
    "UnhandledSigterm",
    "called_hooks",
    "declared_plugin",
    "fresh_selection",
    "implemented_hooks",
    "metric_differences",
    "raise_on_entry",
    "sigterm_guard",
    "state_differences",
    "weight_differences",
]

#: Every way a tensor becomes a host value (each makes the CPU wait for the device).
CONVERSIONS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
#: Samples per batch of every check's job.
BATCH = 8


class TrainingJob:
    """The small real job every check runs: a two-layer perceptron with dropout on
    ``make_data``, SGD with momentum, cross-entropy and an ``acc`` metric, seeded, on
    the CPU (a plugin may move it), validating after every epoch.

    After `fit`, ``trainer`` is the trainer it built (``None`` if building failed)
    and ``recorder`` the `HookRecorder` when ``record=True``.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.recorder: HookRecorder | None = None

    def fit(
        self,
        plugins: Iterable[Any],
        *,
        steps: int = 6,
        epochs: int = 2,
        ckpt_path: str | None = None,
        record: bool = False,
        log_every_n_steps: int = 2,
    ) -> dict[str, torch.Tensor]:
        """Train ``epochs`` epochs of ``steps`` optimizer steps each.

        :return: the final weights, copied to the CPU (``state_dict`` order).
        """
        import torch
        import torch.nn.functional as F

        from hooktrain.metrics import accuracy
        from hooktrain.testing import HookRecorder, make_data, make_model
        from hooktrain.trainer import Trainer

        selected = list(plugins)
        if record:
            self.recorder = HookRecorder()
            selected.append(self.recorder)
        self.trainer = Trainer(
            plugins=selected,
            max_epochs=epochs,
            seed=0,
            device="cpu",
            log_every_n_steps=log_every_n_steps,
        )
        model = make_model(dropout=0.1)
        train, _ = make_data(n=steps * BATCH, batch_size=BATCH)
        # The same validation set whatever the number of steps.
        _, val = make_data(n=64, batch_size=BATCH)
        self.trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
            metrics={"acc": accuracy},
            ckpt_path=ckpt_path,
        )
        return {k: _whole(v).detach().cpu().clone() for k, v in model.state_dict().items()}


def _whole(tensor: Any) -> Any:
    """The whole tensor of a sharded one (torch's ``DTensor``, as a sharding plugin's
    model holds: each process has a part, gathered here on every process), else
    ``tensor`` itself."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def weight_differences(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]
) -> str:
    """An empty string when both hold the same names and bit-identical tensors, else
    what differs (at most three names, with the largest absolute difference)."""
    import torch

    if expected.keys() != actual.keys():
        return f"different parameter names: {sorted(expected)} and {sorted(actual)}"
    differing = []
    for name, value in expected.items():
        other = actual[name]
        if not torch.equal(value, other):
            gap = (value.double() - other.double()).abs().max().item()
            differing.append(f"{name}: largest difference {gap:.3g}")
    return _first_three(differing)


class StateAtFitEnd:
    """Keeps what the plugin registered as ``name`` saves in a checkpoint
    (``checkpoint["plugins"][name]``) as the fit ends, before teardown closes its
    files."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: Any = None

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        self.state = copy.deepcopy(trainer.dump_checkpoint()["plugins"].get(self.name))


def state_differences(expected: Any, actual: Any, ignored: Iterable[str] = ()) -> str:
    """An empty string when two saved plugin states hold the same numbers and tensors
    at the same places, else where they differ (at most three ``key/0/key`` paths).
    Floats and float tensors are equal within a relative 1e-6, as in
    `metric_differences`. Strings are left out, as paths, run ids and versions
    differ between two runs by design, and so are paths matching an ``ignored``
    pattern (``fnmatch``)."""
    return _first_three(_state_paths(expected, actual, tuple(ignored), ""))


def _state_paths(expected: Any, actual: Any, ignored: tuple[str, ...], path: str) -> list[str]:
    import torch

    if path and any(fnmatch.fnmatchcase(path, pattern) for pattern in ignored):
        return []
    here = path or "the top level"

    def inner(a: Any, b: Any, key: Any) -> list[str]:
        return _state_paths(a, b, ignored, f"{path}/{key}" if path else str(key))

    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return [d for k in expected if k in actual for d in inner(expected[k], actual[k], k)]
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        if len(expected) != len(actual):
            return [f"{here} (lengths {len(expected)} and {len(actual)})"]
        pairs = enumerate(zip(expected, actual, strict=True))
        return [d for i, (a, b) in pairs for d in inner(a, b, i)]
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        same = expected.shape == actual.shape and (
            torch.allclose(expected.double(), actual.double(), rtol=1e-6, atol=0.0)
            if expected.is_floating_point()
            else torch.equal(expected, actual)
        )
        return [] if same else [here]
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        if math.isclose(expected, actual, rel_tol=1e-6):
            return []
        return [f"{here} ({expected!r} and {actual!r})"]
    return []


def metric_differences(
    expected: Mapping[str, float],
    actual: Mapping[str, float],
    ignored: Iterable[str] = (),
    labels: tuple[str, str] = ("uninterrupted", "resumed"),
) -> str:
    """An empty string when both hold the same published values, else what differs
    (at most three names, each value followed by its run's label). Names matching an
    ``ignored`` pattern (``fnmatch``) are left out.

    Values are equal within a relative 1e-6: an epoch's mean resumed mid-epoch is
    summed in two parts (before the checkpoint and after it) instead of one, which
    may change its last bits, while a value the plugin failed to restore is off by
    far more.
    """

    def kept(values: Mapping[str, float]) -> dict[str, float]:
        return {
            name: value
            for name, value in values.items()
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in ignored)
        }

    expected, actual = kept(expected), kept(actual)
    if expected.keys() != actual.keys():
        return f"different names: {sorted(expected)} and {sorted(actual)}"
    differing = [
        f"{name}: {value!r} {labels[0]}, {actual[name]!r} {labels[1]}"
        for name, value in expected.items()
        if not math.isclose(value, actual[name], rel_tol=1e-6, abs_tol=1e-12)
        and not (math.isnan(value) and math.isnan(actual[name]))
    ]
    return _first_three(differing)


def called_hooks(job: TrainingJob, selection: Any) -> list[tuple[str, Any, str]]:
    """(hook, code object, registered name) of each implementation of the plugin
    ``selection`` that a short fit of ``job`` calls (one run, recording)."""
    from hooktrain.hookcalls import HOOK_NAMES
    from hooktrain.instrument import implementation_code

    job.fit([selection], steps=2, epochs=1, record=True)
    manager = job.trainer.plugin_manager
    name = job.trainer.plugin_names[0]
    plugin = manager.get_plugin(name)
    called = set(job.recorder.names())
    found = []
    for hook in HOOK_NAMES:
        # on_exception runs after an error already happened; its own errors are
        # reported on stderr, not raised.
        if hook not in called or hook == "on_exception":
            continue
        for impl in getattr(manager.hook, hook).get_hookimpls():
            if impl.plugin is plugin:
                # pluggy registers only functions and methods: each has code.
                found.append((hook, implementation_code(impl.function), name))
    return found


def _first_three(differing: list[str]) -> str:
    """The first three differences, and how many more there are."""
    if len(differing) > 3:
        differing = [*differing[:3], f"and {len(differing) - 3} more"]
    return "; ".join(differing)


class Neighbour:
    """Another plugin of the order check, doing what ordinary plugins do at two
    common places: it draws a number from torch's global generator at every
    batch's start, and halves the gradients before every optimizer step (a power of
    two, so it commutes exactly with any other scaling)."""

    name = "conformance_neighbour"

    @hookimpl
    def on_train_batch_start(self) -> None:
        import torch

        torch.rand(())

    @hookimpl
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(0.5)


def _package_dir(module_name: str) -> str:
    module = sys.modules.get(module_name)
    if module is None or not module.__file__:
        return "\0"
    return str(Path(module.__file__).parent) + os.sep


class HostSyncCounter:
    """Counts every tensor-to-host conversion (`CONVERSIONS`) while `count` runs, by
    where it came from: the first frame outside torch, hooktrain and pluggy (the
    plugin's or the user's code) when there is one before the loop, else the
    innermost reader. Counts the way ``tests/test_sync.py`` does: by patching the
    conversion methods of ``torch.Tensor`` for the test (``monkeypatch``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        self.counts: Counter[str] = Counter()
        self.active = False
        self._library_dirs = tuple(_package_dir(m) for m in ("torch", "hooktrain", "pluggy"))
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.counts[f"Tensor.{name} from {self._where(sys._getframe(1))}"] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def _where(self, frame: Any) -> str:
        reader = None
        while frame is not None:
            filename = frame.f_code.co_filename
            inside = filename.startswith(self._library_dirs)
            if not inside:
                return f"{filename}:{frame.f_lineno} ({frame.f_code.co_name})"
            if reader is None and not filename.startswith(self._library_dirs[0]):
                reader = f"{filename}:{frame.f_lineno} ({frame.f_code.co_name})"
            if filename.endswith(("fit_loop.py", "evaluation.py", "stages.py")):
                break  # the loop itself: no plugin above it
            frame = frame.f_back
        return reader or "torch"

    def count(self, body: Callable[[], Any]) -> Counter[str]:
        """Run ``body`` and return the conversions it made, by origin."""
        self.counts = Counter()
        self.active = True
        try:
            body()
        finally:
            self.active = False
        return Counter(self.counts)


class UnhandledSigterm(Exception):
    """A SIGTERM reached no plugin's handler while `sigterm_guard` was active."""


def implemented_hooks(obj: Any) -> list[str]:
    from hooktrain.hookcalls import HOOK_NAMES

    return [hook for hook in HOOK_NAMES if callable(getattr(obj, hook, None))]


@contextmanager
def sigterm_guard() -> Iterator[None]:
    """While the block runs, a SIGTERM that no plugin handles raises instead of ending
    the test process."""

    def unhandled(signum: int, frame: Any) -> None:
        raise UnhandledSigterm()

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class InjectedHookError(RuntimeError):
    """Raised as a plugin's hook is entered by the hook-errors check."""


@contextmanager
def raise_on_entry(code: Any) -> Iterator[None]:
    """Raise `InjectedHookError` the first time a function with ``code`` is entered.

    A trace function that raises on a ``call`` event raises inside the frame being
    entered, so the exception's traceback holds the plugin's own frame, exactly as if
    its first line had raised; the plugin's code is neither changed nor wrapped.
    """
    previous = sys.gettrace()

    def trace(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "call" and frame.f_code is code:
            sys.settrace(previous)
            raise InjectedHookError(f"injected by the conformance check into {code.co_name}")
        return None

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def declared_plugin(cls: type) -> Any:
    """The ``plugin`` attribute of a `PluginConformance` subclass, as written there."""
    import pytest

    # getattr_static: a plain function given as a factory must not become a method.
    value = inspect.getattr_static(cls, "plugin", None)
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    if value is None:
        pytest.fail(
            f"{cls.__name__}: set the class attribute plugin = ... to what plugins=[...] "
            f"accepts (a name, (name, {{options}}), an import path, a class or an object)"
        )
    return value


def fresh_selection(value: Any) -> Any:
    """A copy of a plugin selection that shares no state with ``value``: every run of
    a check gets its plugin as new, as a fresh process would."""
    import pytest

    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
        try:
            options = copy.deepcopy(dict(value[1]))
        except Exception:  # a stream, a lock: options are inputs, sharing them is fine
            options = dict(value[1])
        return (fresh_selection(value[0]), options)
    if (
        isinstance(value, str | types.ModuleType)
        or inspect.isclass(value)
        or inspect.isroutine(value)
    ):
        return value  # constructed anew by each Trainer, or nothing to copy
    try:
        return copy.deepcopy(value)
    except Exception as exc:
        pytest.fail(
            f"the plugin object {value!r} cannot be copied ({exc}), so each run of a check "
            f"cannot get a fresh one; set plugin = its class, or (its class, {{options}})"
        )
