"""The training loop. Every phase is a hook call; this module knows no plugin."""

from __future__ import annotations

import itertools
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hooktrain import hookspecs
from hooktrain.defaults import CoreDefaults, _user_method, move_to_device, unpack_batch
from hooktrain.errors import ConfigurationError, HookError, NonFiniteLossError, PluginError
from hooktrain.instrument import TRACE_ENV, implementation_code, instrument, stderr_tracer
from hooktrain.metrics import MetricFn, Metrics, RunningMeans
from hooktrain.plugins import PluginManager, PluginSelection, installed_plugins, resolve_plugins

__all__ = ["Trainer", "seed_everything"]

_HOOK_NAMES = tuple(
    name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "hooktrain_spec")
)

# The hooks each evaluation stage calls, and the prefix of its metric names.
_EVAL_STAGES: dict[str, dict[str, str]] = {
    stage: {
        "start": f"on_{word}_start",
        "epoch_start": f"on_{word}_epoch_start",
        "batch_start": f"on_{word}_batch_start",
        "batch_end": f"on_{word}_batch_end",
        "epoch_end": f"on_{word}_epoch_end",
        "end": f"on_{word}_end",
        "prefix": prefix,
    }
    for stage, word, prefix in (
        ("validate", "validation", "val_"),
        ("test", "test", "test_"),
        ("predict", "predict", ""),
    )
}


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed) and torch (every device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def _rng_state() -> dict[str, Any]:
    # Stored as tensors and plain lists so that torch.load(weights_only=True) reads
    # them back: no NumPy objects, no pickled classes.
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # One int64 tensor rather than a list of 625 ints: pickling the list went
        # through torch.save's per-object hook 625 times, about 0.3 ms a checkpoint.
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    internal = python["state"]
    if isinstance(internal, torch.Tensor):
        internal = internal.tolist()
    random.setstate((python["version"], tuple(internal), python["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        np_state = state["numpy"]
        numpy.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype("uint32"),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached"],
            )
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_INSTALLED_VERSIONS: dict[str, str] = {}


def _installed_versions() -> dict[str, str]:
    """Installed plugin versions by entry-point name, read once per process."""
    if not _INSTALLED_VERSIONS:
        _INSTALLED_VERSIONS.update(
            {name: plugin.version for name, plugin in installed_plugins().items()}
        )
    return _INSTALLED_VERSIONS


def _batch_size(batch: Any) -> int:
    # Called every step: the common tuple is tested first, and shape[0] is read
    # rather than len(), which goes through a Python-level Tensor.__len__.
    cls = type(batch)
    if cls is tuple or cls is list or isinstance(batch, tuple | list):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.ndim:
                return item.shape[0]
        return 1
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, Mapping):
        for item in batch.values():
            if isinstance(item, torch.Tensor) and item.ndim:
                return item.shape[0]
    return 1


class _ResolvedHooks:
    """Each hook, looked up once per stage: ``None`` when nothing implements it, the
    core's function when only the core does, a direct caller when no implementation
    is a wrapper, and pluggy's caller otherwise."""

    def __init__(self, plugin_manager: PluginManager, defaults: CoreDefaults) -> None:
        for name in _HOOK_NAMES:
            caller = getattr(plugin_manager.hook, name)
            impls = caller.get_hookimpls()
            if not impls:
                resolved: Any = None
            elif len(impls) == 1 and impls[0].plugin is defaults:
                resolved = impls[0].function
            elif any(impl.wrapper or impl.hookwrapper for impl in impls):
                resolved = caller
            else:
                firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))
                resolved = _direct_caller(impls, firstresult)
            setattr(self, name, resolved)

    def __getattr__(self, name: str) -> Any:  # only for names missing from hookspecs
        raise AttributeError(f"hooktrain has no hook named {name!r}")


def _direct_caller(impls: Sequence[Any], firstresult: bool) -> Callable[..., Any]:
    """Call plain implementations (no wrappers among them) the way pluggy would: in
    its order (the reverse of ``get_hookimpls()``), each given only the arguments it
    names, returning the first non-``None`` result for a ``firstresult`` hook and the
    list of non-``None`` results otherwise.

    pluggy's general machinery (copying the implementation list, a generator-based
    call loop built for wrappers) costs about a microsecond per call; a hook called
    every step with one or two implementations paid that 0.5 to 1% of a small
    model's step. Instrumentation (profile, trace) replaces ``impl.function`` before
    hooks are resolved, so it sees these calls too.
    """
    calls = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(impls))
    if firstresult:

        def call_first(**kwargs: Any) -> Any:
            for function, names in calls:
                result = function(*[kwargs[name] for name in names])
                if result is not None:
                    return result
            return None

        return call_first
    if len(calls) == 1:
        function, names = calls[0]
        if not names:

            def call_one_bare(**kwargs: Any) -> list[Any]:
                result = function()
                return [] if result is None else [result]

            return call_one_bare

        def call_one(**kwargs: Any) -> list[Any]:
            result = function(*[kwargs[name] for name in names])
            return [] if result is None else [result]

        return call_one

    def call_each(**kwargs: Any) -> list[Any]:
        results = []
        for function, names in calls:
            result = function(*[kwargs[name] for name in names])
            if result is not None:
                results.append(result)
        return results

    return call_each


class _Scheduler:
    __slots__ = ("frequency", "interval", "monitor", "scheduler")

    def __init__(self, scheduler: Any, interval: str, frequency: int, monitor: str | None):
        if interval not in ("step", "epoch"):
            raise ConfigurationError(
                f"LR scheduler interval must be 'step' or 'epoch', not {interval!r}"
            )
        self.scheduler = scheduler
        self.interval = interval
        self.frequency = frequency
        self.monitor = monitor


class Trainer:
    """Runs ``fit``, ``validate``, ``test`` and ``predict``; plugins do the rest.

    :param plugins: what to load, in the order their implementations run:
        entry-point names (``"tqdm"``), import paths (``"pkg.mod:Plugin"``), plugin
        objects, or pairs ``(name, {options})``. ``None`` selects the default set
        (``hooktrain.plugins.DEFAULT_PLUGINS``, those installed); ``[]`` selects none.
    :param max_epochs: epochs to train (at least 1).
    :param max_steps: stop after this many optimizer steps, even mid-epoch.
    :param seed: seeds Python, NumPy and torch when each stage starts, and the
        per-epoch shuffling order of the training data.
    :param device: where the core puts the model and batches; default CUDA when
        available, else the CPU. A plugin may change it in ``setup``.
    :param accumulate_grad_batches: micro-batches per optimizer step.
    :param gradient_clip_val: clip the gradient norm to this value before each step.
    :param check_val_every_n_epoch: validate after every N-th epoch.
    :param val_every_n_steps: also validate every N optimizer steps.
    :param limit_train_batches: at most this many batches per training epoch (and
        likewise ``limit_val_batches``, ``limit_test_batches``, ``limit_predict_batches``).
    :param log_every_n_steps: publish step metrics (and check the loss is finite)
        every N optimizer steps.
    :param check_finite_every_step: check the loss every step (one device sync per
        step) instead of every ``log_every_n_steps``.
    """

    def __init__(
        self,
        plugins: Sequence[PluginSelection] | None = None,
        *,
        max_epochs: int = 1,
        max_steps: int | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        check_val_every_n_epoch: int = 1,
        val_every_n_steps: int | None = None,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        limit_test_batches: int | None = None,
        limit_predict_batches: int | None = None,
        log_every_n_steps: int = 50,
        check_finite_every_step: bool = False,
    ) -> None:
        _require_int("max_epochs", max_epochs, minimum=1)
        _require_int("max_steps", max_steps, minimum=1, optional=True)
        _require_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        _require_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
        _require_int("val_every_n_steps", val_every_n_steps, minimum=1, optional=True)
        _require_int("log_every_n_steps", log_every_n_steps, minimum=1)
        for name, value in (
            ("limit_train_batches", limit_train_batches),
            ("limit_val_batches", limit_val_batches),
            ("limit_test_batches", limit_test_batches),
            ("limit_predict_batches", limit_predict_batches),
        ):
            _require_int(name, value, minimum=0, optional=True)
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ConfigurationError(f"gradient_clip_val must be > 0, got {gradient_clip_val!r}")
        if plugins is not None and (
            isinstance(plugins, str | bytes) or not isinstance(plugins, Sequence)
        ):
            raise ConfigurationError(
                f"plugins must be a list (of names, objects or (name, options) pairs), "
                f"got {plugins!r}"
            )

        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.seed = seed
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_every_n_steps = val_every_n_steps
        self.limits = {
            "train": limit_train_batches,
            "validate": limit_val_batches,
            "test": limit_test_batches,
            "predict": limit_predict_batches,
        }
        self.log_every_n_steps = log_every_n_steps
        self.check_finite_every_step = check_finite_every_step
        self.device = torch.device(device) if device is not None else _default_device()

        #: pluggy's manager; ``plugin_manager.hook.<name>(trainer=..., ...)`` calls a hook.
        self.plugin_manager = PluginManager()
        self._defaults = CoreDefaults()
        self.plugin_manager.register(self._defaults, name="core")
        loaded = resolve_plugins(plugins)
        # pluggy calls the last registered implementation first; registering in
        # reverse makes the list order the call order.
        for name, plugin in reversed(loaded):
            self.plugin_manager.register(plugin, name=name)
        #: Registered names of the selected plugins, in list order.
        self.plugin_names: list[str] = [name for name, _ in loaded]
        if os.environ.get(TRACE_ENV, "") not in ("", "0"):
            instrument(self.plugin_manager, stderr_tracer)

        # Public state that hooks read (still readable after a stage returns).
        self.model: nn.Module | None = None
        self.module: nn.Module | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[Any] = []
        self.train_dataloader: Iterable[Any] | None = None
        self.eval_dataloaders: list[Iterable[Any]] = []
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.metric_fns: dict[str, MetricFn] = {}
        self.metrics = Metrics()
        self.current_epoch = 0
        self.global_step = 0
        #: Batches of the current epoch already trained (a checkpoint resumes after them).
        self.epoch_batches_done = 0
        #: Batches the current training epoch runs (``len`` of the loader capped by
        #: ``limit_train_batches``); ``None`` when the loader has no length. Set before
        #: ``on_train_epoch_start``.
        self.num_training_batches: int | None = None
        #: Batches each loader of the running evaluation stage yields, the same way;
        #: set before ``on_validation_start`` (``on_test_start``, ...).
        self.num_eval_batches: list[int | None] = []
        #: True once every batch of the current epoch was trained.
        self.epoch_complete = False
        #: Set it to stop training cleanly after the next optimizer step (all processes
        #: agree on it); a stop in the middle of an epoch skips that epoch's end.
        self.should_stop = False
        #: Whether the current micro-batch completes a gradient-accumulation window.
        self.sync_gradients = True
        self.last_step_skipped = False
        self.global_rank = 0
        self.world_size = 1
        self.stage: str | None = None
        #: Seed of the training data's per-epoch shuffling (saved in checkpoints).
        self.data_seed = 0
        self._schedulers: list[_Scheduler] = []
        self._hooks: _ResolvedHooks | None = None
        self._pending_rng: Mapping[str, Any] | None = None
        self._resume_skip = 0
        self._log_prefix = ""
        self._active_means: RunningMeans | None = None
        self._train_means = RunningMeans()
        self._logged_since_publish: set[str] = set()
        self._checked_steps_from = 1
        self._batch_size = 1

    # ------------------------------------------------------------------ properties

    @property
    def is_global_zero(self) -> bool:
        """True on the process that writes files and draws progress (rank 0)."""
        return self.global_rank == 0

    @property
    def hparams(self) -> dict[str, Any]:
        """The trainer's settings and plugin list, for loggers to record."""
        return {
            "max_epochs": self.max_epochs,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "gradient_clip_val": self.gradient_clip_val,
            "check_val_every_n_epoch": self.check_val_every_n_epoch,
            "val_every_n_steps": self.val_every_n_steps,
            "log_every_n_steps": self.log_every_n_steps,
            "limit_train_batches": self.limits["train"],
            "limit_val_batches": self.limits["validate"],
            "device": str(self.device),
            "world_size": self.world_size,
            "plugins": list(self.plugin_names),
        }

    # ------------------------------------------------------------------ logging

    def log(self, name: str, value: Any, *, batch_size: int | None = None) -> None:
        """Record a metric value (a number or a 0-dim tensor; tensors are not read).

        Inside a batch the value also joins the epoch's batch-size-weighted mean;
        inside validation or test the name gets the ``val_`` / ``test_`` prefix
        unless it already has it. ``trainer.metrics[name]`` returns the latest value.
        """
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigurationError(
                    f"trainer.log({name!r}, ...) needs a single number, got a tensor of shape "
                    f"{tuple(value.shape)}"
                )
            value = value.detach()
        elif not isinstance(value, int | float):
            raise ConfigurationError(
                f"trainer.log({name!r}, ...) needs a number or a tensor, got {type(value).__name__}"
            )
        prefix = self._log_prefix
        if prefix and not name.startswith(prefix):
            name = prefix + name
        self.metrics.set(name, value)
        self._logged_since_publish.add(name)
        if self._active_means is not None:
            self._active_means.add(name, value, batch_size or self._batch_size)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (the tensor itself with one)."""
        if self.world_size == 1:
            return tensor
        reduced = self.plugin_manager.hook.all_reduce(trainer=self, tensor=tensor)
        return tensor if reduced is None else reduced

    def _publish(self, names: Iterable[str], scope: str) -> None:
        log_metrics = self._hooks.log_metrics if self._hooks else None
        if log_metrics is None:
            return
        values = self.metrics.floats(names)
        if values:
            log_metrics(trainer=self, metrics=values, step=self.global_step, scope=scope)

    # ------------------------------------------------------------------ checkpoints

    def dump_checkpoint(self) -> dict[str, Any]:
        """Everything needed to resume this run exactly, as a mapping of tensors,
        numbers, strings, lists and dicts (loadable with ``weights_only=True``).

        Holds the model, optimizers, LR schedulers, progress, RNG states, metrics,
        versions and the plugin list; then ``on_save_checkpoint`` lets each plugin
        add its own state under ``checkpoint["plugins"][name]``. Tensors are the live
        ones: copy them before writing from another thread.
        """
        if self.module is None:
            raise ConfigurationError("dump_checkpoint() needs a model: call it during fit")
        from hooktrain import __version__

        versions = self.__dict__.get("_plugin_versions")
        if versions is None:
            # Reading package metadata takes 10-20 ms; a run saving every few steps
            # would pay it each time, and installed versions do not change mid-run.
            # Kept for the process too: a short fit per trainer (a sweep, the
            # benchmark) paid it on its first save, 10% of a 0.1 s fit.
            installed = _installed_versions()
            versions = self._plugin_versions = {
                name: installed[name] for name in self.plugin_names if name in installed
            }
        checkpoint: dict[str, Any] = {
            "format": "hooktrain-checkpoint/1",
            "hooktrain_version": __version__,
            "plugin_list": list(self.plugin_names),
            "plugin_versions": dict(versions),
            "model": self.module.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "lr_schedulers": [entry.scheduler.state_dict() for entry in self._schedulers],
            "progress": {
                "epoch": self.current_epoch,
                "global_step": self.global_step,
                "epoch_batches_done": self.epoch_batches_done,
                "epoch_complete": self.epoch_complete,
            },
            "data_seed": self.data_seed,
            "rng": _rng_state(),
            "metrics": self.metrics.floats(),
            "running_means": self._train_means.state_dict(),
            "plugins": {},
        }
        self.plugin_manager.hook.on_save_checkpoint(trainer=self, checkpoint=checkpoint)
        return checkpoint

    def restore_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Put the run back where ``checkpoint`` (from :meth:`dump_checkpoint`) was
        taken, then call ``on_load_checkpoint``. RNG states are applied when the loop
        reaches the saved position, so the data order and dropout match exactly."""
        if self.module is None:
            raise ConfigurationError("restore_checkpoint() needs a model: call it during fit")
        _load_model_state(self.module, checkpoint["model"])
        saved_optimizers = checkpoint.get("optimizers", [])
        if len(saved_optimizers) != len(self.optimizers):
            raise ConfigurationError(
                f"the checkpoint holds {len(saved_optimizers)} optimizer(s), the run has "
                f"{len(self.optimizers)}"
            )
        for optimizer, state in zip(self.optimizers, saved_optimizers, strict=True):
            optimizer.load_state_dict(state)
        saved_schedulers = checkpoint.get("lr_schedulers", [])
        if len(saved_schedulers) != len(self._schedulers):
            raise ConfigurationError(
                f"the checkpoint holds {len(saved_schedulers)} LR scheduler(s), the run has "
                f"{len(self._schedulers)}"
            )
        for entry, state in zip(self._schedulers, saved_schedulers, strict=True):
            entry.scheduler.load_state_dict(state)
        progress = checkpoint["progress"]
        self.global_step = int(progress["global_step"])
        if progress["epoch_complete"]:
            self.current_epoch = int(progress["epoch"]) + 1
            self._resume_skip = 0
        else:
            self.current_epoch = int(progress["epoch"])
            self._resume_skip = int(progress["epoch_batches_done"])
            self._train_means.load_state_dict(checkpoint.get("running_means", {}), self.device)
        self.data_seed = int(checkpoint.get("data_seed", self.data_seed))
        self.metrics.update_raw(checkpoint.get("metrics", {}))
        self._checked_steps_from = self.global_step + 1
        self._pending_rng = checkpoint.get("rng")
        self.plugin_manager.hook.on_load_checkpoint(trainer=self, checkpoint=checkpoint)
        not_restored = sorted(set(checkpoint.get("plugins", {})) - set(self.plugin_names))
        if not_restored:
            print(
                f"hooktrain: the checkpoint holds state of plugins not selected now, not "
                f"restored: {', '.join(not_restored)}",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ entry points

    def fit(
        self,
        model: nn.Module,
        train_dataloaders: Iterable[Any],
        val_dataloaders: Iterable[Any] | Sequence[Iterable[Any]] | None = None,
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train ``model`` for ``max_epochs`` (or ``max_steps``).

        :param model: a plain ``nn.Module`` (with ``loss_fn`` and ``optimizer``) or
            one that defines ``training_step`` and optionally ``validation_step``
            and ``configure_optimizers``.
        :param train_dataloaders: an iterable of batches, usually a ``DataLoader``.
        :param val_dataloaders: one iterable or a list of them.
        :param loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        :param optimizer: an optimizer, or a callable taking the parameters.
        :param metrics: name to ``fn(outputs, targets)``, computed on training and
            validation batches (``hooktrain.accuracy`` for example).
        :param ckpt_path: a checkpoint to resume from (``"last"`` with a plugin that
            keeps checkpoints).
        """
        self._check_model(model, training=True)
        self._check_loader("train_dataloaders", train_dataloaders)
        eval_loaders = self._as_loader_list("val_dataloaders", val_dataloaders)
        if loss_fn is None and not callable(getattr(model, "training_step", None)):
            raise ConfigurationError(
                "fit() needs loss_fn=... for a model without its own "
                "training_step(batch, batch_idx)"
            )
        self._begin(model, loss_fn, metrics)
        self.train_dataloader = train_dataloaders
        self.eval_dataloaders = eval_loaders
        self._run_stage("fit", lambda: self._fit(optimizer, ckpt_path))

    def validate(
        self,
        model: nn.Module,
        dataloaders: Iterable[Any] | Sequence[Iterable[Any]],
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> dict[str, float]:
        """Run one validation pass; return the ``val_*`` metrics."""
        return self._evaluate("validate", model, dataloaders, loss_fn, metrics)

    def test(
        self,
        model: nn.Module,
        dataloaders: Iterable[Any] | Sequence[Iterable[Any]],
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> dict[str, float]:
        """Run one test pass; return the ``test_*`` metrics."""
        return self._evaluate("test", model, dataloaders, loss_fn, metrics)

    def predict(
        self, model: nn.Module, dataloaders: Iterable[Any] | Sequence[Iterable[Any]]
    ) -> Any:
        """Run the model over ``dataloaders`` without gradients.

        :return: the predictions concatenated along the first dimension when every
            batch produced a tensor, else the list of each batch's predictions.
        """
        result = self._evaluate("predict", model, dataloaders, None, None)
        predictions = result["predictions"]
        if predictions and all(isinstance(p, torch.Tensor) and p.ndim for p in predictions):
            return torch.cat(predictions)
        return predictions

    # ------------------------------------------------------------------ stage plumbing

    def _begin(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None,
        metrics: Mapping[str, MetricFn] | None,
    ) -> None:
        self.module = self.model = model
        self.loss_fn = loss_fn
        self.metric_fns = dict(metrics or {})
        self.should_stop = False

    def _run_stage(self, stage: str, body: Callable[[], Any]) -> Any:
        """setup, the body, teardown; on any exception ``on_exception`` first."""
        self.stage = stage
        hook = self.plugin_manager.hook
        failure: BaseException | None = None
        try:
            if self.seed is not None:
                seed_everything(self.seed)
            hook.setup(trainer=self, stage=stage)
            # Hooks are resolved by each stage's body, after prepare (which may wrap
            # or register things); until then nothing is published.
            self._hooks = None
            _move_module(self.module, self.device)
            return body()
        except BaseException as exc:
            failure = self._explain(exc)
            try:
                hook.on_exception(trainer=self, exception=failure)
            except Exception as inner:
                print(f"hooktrain: on_exception itself raised: {inner!r}", file=sys.stderr)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            try:
                hook.teardown(trainer=self, stage=stage)
            except Exception as exc:
                if failure is None:
                    raise self._explain(exc) from exc
                print(f"hooktrain: teardown raised after an error: {exc!r}", file=sys.stderr)
            self._active_means = None
            self._log_prefix = ""

    def _explain(self, exc: BaseException) -> BaseException:
        """Say where ``exc`` happened: a :class:`HookError` naming the plugin and the
        hook when a plugin raised it, else ``exc`` itself with a note."""
        where = f"{self.stage} at epoch {self.current_epoch}, global step {self.global_step}"
        if isinstance(exc, HookError | PluginError):
            return exc
        culprit = self._culprit(exc) if isinstance(exc, Exception) else None
        if culprit is None:
            exc.add_note(f"hooktrain: raised during {where}")
            return exc
        plugin, hook_name = culprit
        return HookError(
            f"plugin {plugin!r} raised in hook {hook_name!r} during {where}: "
            f"{type(exc).__name__}: {exc}",
            plugin=plugin,
            hook=hook_name,
        )

    def _culprit(self, exc: BaseException) -> tuple[str, str] | None:
        owners: dict[Any, tuple[str, str]] = {}
        for hook_name in _HOOK_NAMES:
            for impl in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
                code = implementation_code(impl.function)
                if code is not None:
                    owners[code] = (self.plugin_manager.get_name(impl.plugin) or "?", hook_name)
        found = None
        traceback = exc.__traceback__
        while traceback is not None:
            owner = owners.get(traceback.tb_frame.f_code)
            if owner is not None:
                found = owner  # keep the innermost: the implementation that raised
            traceback = traceback.tb_next
        if found is None or found[0] == "core":
            return None
        return found

    def _check_model(self, model: Any, *, training: bool) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if training and not any(p.requires_grad for p in model.parameters()):
            raise ConfigurationError(
                f"{type(model).__name__} has no trainable parameters (none with requires_grad=True)"
            )

    def _check_loader(self, what: str, loader: Any) -> None:
        if loader is None or not isinstance(loader, Iterable):
            raise ConfigurationError(
                f"{what} must be an iterable of batches (a DataLoader), got {type(loader).__name__}"
            )
        try:
            length = len(loader)  # type: ignore[arg-type]
        except TypeError:
            return
        if length == 0:
            raise ConfigurationError(
                f"{what} is empty: it yields no batches (is the dataset empty, or "
                f"drop_last=True with fewer samples than batch_size?)"
            )

    def _as_loader_list(self, what: str, loaders: Any) -> list[Iterable[Any]]:
        if loaders is None:
            return []
        if (
            isinstance(loaders, list | tuple)
            and loaders
            and all(
                isinstance(item, Iterable) and not isinstance(item, torch.Tensor)
                for item in loaders
            )
            and not isinstance(loaders[0], torch.Tensor | tuple)
        ):
            result = list(loaders)
        else:
            result = [loaders]
        for loader in result:
            self._check_loader(what, loader)
        return result

    # ------------------------------------------------------------------ fit

    def _fit(self, optimizer: Any, ckpt_path: Any) -> None:
        self._configure_optimizers(optimizer)
        self.current_epoch = 0
        self.global_step = 0
        self.epoch_batches_done = 0
        self.epoch_complete = False
        self._resume_skip = 0
        self._pending_rng = None
        self._train_means.reset()
        self._checked_steps_from = 1
        self.data_seed = (
            self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        )
        self.plugin_manager.hook.prepare(trainer=self, stage="fit")
        if len(self.lr_schedulers) != len(self._schedulers):
            raise PluginError("a prepare implementation changed the number of LR schedulers")
        for entry, scheduler in zip(self._schedulers, self.lr_schedulers, strict=True):
            entry.scheduler = scheduler  # a plugin may have wrapped it
        self._hooks = hooks = _ResolvedHooks(self.plugin_manager, self._defaults)
        if ckpt_path is not None:
            checkpoint = hooks.load_checkpoint(trainer=self, ckpt_path=os.fspath(ckpt_path))
            if checkpoint:
                self.restore_checkpoint(checkpoint)
        if hooks.on_fit_start is not None:
            hooks.on_fit_start(trainer=self)
        # current_epoch stays on the last epoch trained once the loop ends.
        while (
            self.current_epoch < self.max_epochs
            and not self.should_stop
            and not self._max_steps_reached()
        ):
            self._train_epoch()
            if self.world_size > 1:
                # should_stop set at an epoch's end (early stopping, a signal) must stop
                # every process here, or those going on wait in the next collective.
                self._agree_on_stop()
            if (
                self.should_stop
                or self._max_steps_reached()
                or not self.epoch_complete
                or self.current_epoch + 1 >= self.max_epochs
            ):
                break
            self.current_epoch += 1
        if hooks.on_fit_end is not None:
            hooks.on_fit_end(trainer=self)

    def _max_steps_reached(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _configure_optimizers(self, optimizer: Any) -> None:
        module = self.module
        schedulers: list[_Scheduler] = []
        if optimizer is not None:
            if isinstance(optimizer, torch.optim.Optimizer):
                optimizers = [optimizer]
            elif callable(optimizer):
                optimizers = [optimizer(module.parameters())]
            else:
                raise ConfigurationError(
                    f"optimizer must be a torch.optim.Optimizer or a callable taking the "
                    f"parameters, got {type(optimizer).__name__}"
                )
        elif callable(getattr(module, "configure_optimizers", None)):
            optimizers, schedulers = _parse_optimizer_config(module.configure_optimizers())
        else:
            raise ConfigurationError(
                "fit() needs optimizer=... (an optimizer or a callable taking the parameters), "
                "or a configure_optimizers() method on the model"
            )
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise ConfigurationError(f"expected an optimizer, got {type(opt).__name__}")
        self.optimizers = optimizers
        self._schedulers = schedulers
        self.lr_schedulers = [entry.scheduler for entry in schedulers]

    def _train_epoch(self) -> None:
        hooks = self._hooks
        trainer = self
        model = self.model
        model.train()
        skip = self._resume_skip
        self._resume_skip = 0
        if skip == 0:
            self._train_means.reset()
            self._apply_pending_rng()
        self.epoch_batches_done = skip
        self.epoch_complete = False
        loader = self.train_dataloader
        total = self.num_training_batches = _limited_length(loader, self.limits["train"])
        if hooks.on_train_epoch_start is not None:
            hooks.on_train_epoch_start(trainer=trainer)

        iterable = hooks.batch_iterator(
            trainer=trainer, dataloader=loader, stage="train", skip_batches=skip
        )
        if total is not None:
            iterable = itertools.islice(iterable, max(0, total - skip))
        self._apply_pending_rng()  # mid-epoch resume: after the iterator drew its seeds

        device = self.device
        accumulate = self.accumulate_grad_batches
        transfer = hooks.transfer_batch_to_device
        on_batch_start = hooks.on_train_batch_start
        forward = hooks.forward_step
        on_before_backward = hooks.on_before_backward
        backward = hooks.backward
        on_after_backward = hooks.on_after_backward
        on_batch_end = hooks.on_train_batch_end
        means = self._train_means
        metric_fns = self.metric_fns
        metrics = self.metrics
        log_every = self.log_every_n_steps
        val_every = self.val_every_n_steps if self.eval_dataloaders else None
        check_every_step = self.check_finite_every_step
        tensor_type = torch.Tensor
        self._active_means = means
        pending_window = False
        # With only the core's forward_step and a plain module (no training_step), the
        # loop computes the loss itself: the hook call and the outputs dictionary cost
        # about 3% of a 0.2 ms step. The dictionary is built only for those who read it.
        loss_fn = self.loss_fn
        plain_forward = (
            getattr(forward, "__func__", None) is CoreDefaults.forward_step
            and loss_fn is not None
            and _user_method(self.module, "training_step") is None
        )
        keep_outputs = bool(metric_fns) or on_batch_end is not None
        core = self._defaults
        # The core's own transfer and backward are called without keyword plumbing,
        # and a plain optimizer step (one optimizer, no hook around it) is inlined.
        move_directly = getattr(transfer, "__self__", None) is core
        backward_directly = getattr(backward, "__self__", None) is core
        plain_step = (
            getattr(hooks.optimizer_step, "__self__", None) is core
            and hooks.unscale_gradients is None
            and hooks.on_before_optimizer_step is None
            and hooks.on_before_zero_grad is None
            and self.gradient_clip_val is None
            and len(self.optimizers) == 1
            and not any(entry.interval == "step" for entry in self._schedulers)
        )
        only_optimizer = self.optimizers[0] if plain_step else None
        max_steps = self.max_steps if self.max_steps is not None else -1
        distributed = self.world_size > 1
        only_the_core_takes_part = (
            plain_forward
            and move_directly
            and backward_directly
            and plain_step
            and on_batch_start is None
            and on_before_backward is None
            and on_after_backward is None
            and accumulate == 1
            and not metric_fns
            and val_every is None
            and not check_every_step
            and not distributed
        )

        batch_idx = skip
        stopped_early = False
        if only_the_core_takes_part:
            batch_idx, stopped_early = self._train_batches_alone(iterable, skip, on_batch_end)
            iterable = ()
        for batch in iterable:
            if move_directly:
                batch = move_to_device(batch, device)
            else:
                batch = transfer(trainer=trainer, batch=batch, device=device)
            if on_batch_start is not None:
                on_batch_start(trainer=trainer, batch=batch, batch_idx=batch_idx)
            sync = accumulate == 1 or (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == total
            self.sync_gradients = sync
            self._batch_size = size = _batch_size(batch)
            if plain_forward and type(batch) in (tuple, list) and len(batch) == 2:
                inputs, targets = batch
                predicted = model(inputs)
                loss = loss_fn(predicted, targets)
                if keep_outputs or type(loss) is not tensor_type:
                    outputs = {"loss": loss, "outputs": predicted, "targets": targets}
                else:
                    outputs = loss
            else:
                outputs = forward(trainer=trainer, batch=batch, batch_idx=batch_idx, stage="train")
            if type(outputs) is tensor_type:
                loss = outputs
            elif type(outputs) is dict and type(outputs.get("loss")) is tensor_type:
                loss = outputs["loss"]  # the usual dict, without the Mapping ABC check
            else:
                loss = _loss_of(outputs)
            if loss.ndim != 0 or not loss.requires_grad:
                _raise_bad_loss(loss)
            if check_every_step and not torch.isfinite(loss):
                # Before backward, so the bad step never reaches the weights.
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at epoch {self.current_epoch}, "
                    f"batch {batch_idx}, global step {self.global_step + 1}"
                )
            if accumulate > 1:
                loss = loss / accumulate
            if on_before_backward is not None:
                on_before_backward(trainer=trainer, loss=loss)
            if backward_directly:
                loss.backward()
            else:
                backward(trainer=trainer, loss=loss)
            if on_after_backward is not None:
                on_after_backward(trainer=trainer)
            pending_window = not sync
            if sync:
                if only_optimizer is not None:
                    only_optimizer.step()
                    only_optimizer.zero_grad(set_to_none=True)
                    self.last_step_skipped = False
                    self.global_step += 1
                else:
                    self._optimizer_step()
            detached = loss.detach()
            if accumulate > 1:
                detached = detached * accumulate
            means.add("loss", detached, size)
            metrics.set("loss", detached)
            if metric_fns and type(outputs) is dict and "outputs" in outputs:
                self._add_metric_values(means, "", outputs["outputs"], outputs["targets"], False)
            batch_idx += 1
            self.epoch_batches_done = batch_idx
            if val_every is not None and sync and self.global_step % val_every == 0:
                self._run_validation_in_fit()
            if on_batch_end is not None:
                on_batch_end(trainer=trainer, outputs=outputs, batch=batch, batch_idx=batch_idx - 1)
            if sync and self.global_step % log_every == 0:
                self._check_finite()
                self._publish({"loss", *self._logged_since_publish}, "step")
                self._logged_since_publish.clear()
            # Stop only where an optimizer step just happened: inside an accumulation
            # window the gradients gathered so far would be lost with the stop.
            if sync:
                if distributed:
                    self._agree_on_stop()
                if self.should_stop or self.global_step == max_steps:
                    stopped_early = True
                    break
        self._active_means = None

        if batch_idx == 0 and skip == 0:
            raise ConfigurationError(
                "the training dataloader yielded no batches in epoch "
                f"{self.current_epoch}; hooktrain needs at least one"
            )
        # A checkpoint taken at the last batch's end resumes here with nothing left
        # to train, and still runs this epoch's end (validation, epoch schedulers).
        exhausted = batch_idx >= total if total is not None else not stopped_early
        if pending_window and exhausted:
            # An iterable of unknown length ended inside an accumulation window.
            self.sync_gradients = True
            self._optimizer_step()
        if self.should_stop and not exhausted:
            return  # stopped mid-epoch: no epoch end, a resume continues this epoch
        self._check_finite()
        metrics.update_raw(means.compute(self.all_reduce if self.world_size > 1 else None))
        epoch_names = means.names()
        if self.eval_dataloaders and (self.current_epoch + 1) % self.check_val_every_n_epoch == 0:
            self._run_validation_in_fit()
        for entry in self._schedulers:
            if entry.interval == "epoch" and (self.current_epoch + 1) % entry.frequency == 0:
                with warnings.catch_warnings():
                    # A run resumed at an epoch's last batch steps the scheduler before
                    # this process stepped the optimizer; the order is right, torch warns.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                    self._step_scheduler(entry)
        # From here a checkpoint resumes at the next epoch (unless max_steps cut it short).
        self.epoch_complete = exhausted
        if hooks.on_train_epoch_end is not None:
            hooks.on_train_epoch_end(trainer=trainer)
        self._publish(epoch_names, "epoch")

    def _train_batches_alone(
        self, iterable: Iterable[Any], batch_idx: int, on_batch_end: Callable[..., Any] | None
    ) -> tuple[int, bool]:
        """The batches of an epoch when no plugin takes part in a training step other
        than by watching its end (``on_train_batch_end``: progress bars, loggers).

        It does what the general loop does with the core's defaults (move the batch,
        forward, loss, backward, step, zero the gradients, keep the loss on the device,
        call ``on_train_batch_end``, publish every ``log_every_n_steps``) without the
        lookups and calls that would find nobody: with a small model they are a few
        percent of a step. The test ``tests/test_benchmark_fast_path.py`` holds both
        loops to identical results and identical hook arguments.

        :return: the batch index reached, and whether the loop stopped early.
        """
        device = self.device
        model = self.model
        loss_fn = self.loss_fn
        optimizer = self.optimizers[0]
        means = self._train_means
        metrics = self.metrics
        log_every = self.log_every_n_steps
        max_steps = self.max_steps if self.max_steps is not None else -1
        # Every batch ends an optimizer step here (no accumulation, nothing skips).
        self.sync_gradients = True
        self.last_step_skipped = False
        # With nobody watching the steps, the losses of a log interval are handed to
        # the running means at its end: a method call less per step. A watcher may
        # read the means at any step (a checkpoint), so then each loss goes in at
        # once. The latest loss is always stored: a progress bar's timer thread may
        # read it between publications.
        watched = on_batch_end is not None
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        tensor_type = torch.Tensor
        for batch in iterable:
            batch = move_to_device(batch, device)
            inputs, targets = (
                batch if type(batch) is tuple and len(batch) == 2 else (unpack_batch(batch))
            )
            # what _batch_size(batch) finds first for the usual pair, without the call
            size = (
                inputs.shape[0]
                if type(inputs) is tensor_type and inputs.ndim
                else _batch_size(batch)
            )
            self._batch_size = size
            if not watched:
                predicted = None
                result = loss_fn(model(inputs), targets)
            else:  # the hook is given the model's output
                predicted = model(inputs)
                result = loss_fn(predicted, targets)
            # as the general loop reads it
            loss = result if type(result) is torch.Tensor else _loss_of(result)
            if loss.ndim != 0 or not loss.requires_grad:
                _raise_bad_loss(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.global_step = step = self.global_step + 1
            detached = loss.detach()
            batch_idx += 1
            self.epoch_batches_done = batch_idx
            metrics.set("loss", detached)
            if watched:
                means.add("loss", detached, size)
                outputs = {"loss": result, "outputs": predicted, "targets": targets}
                on_batch_end(trainer=self, outputs=outputs, batch=batch, batch_idx=batch_idx - 1)
            else:
                losses.append(detached)
                sizes.append(size)
            if step % log_every == 0:
                if losses:
                    self._hand_over_losses(losses, sizes)
                self._check_finite()
                self._publish({"loss", *self._logged_since_publish}, "step")
                self._logged_since_publish.clear()
            if self.should_stop or step == max_steps:
                if losses:
                    self._hand_over_losses(losses, sizes)
                return batch_idx, True
        if losses:
            self._hand_over_losses(losses, sizes)
        return batch_idx, False

    def _hand_over_losses(self, losses: list[torch.Tensor], sizes: list[int]) -> None:
        """Put the losses the lean loop kept aside into the running means, and empty
        both lists."""
        self._train_means.extend("loss", losses, sizes)
        losses.clear()
        sizes.clear()

    def _optimizer_step(self) -> None:
        hooks = self._hooks
        trainer = self
        clip = self.gradient_clip_val
        stepped_all = True
        for optimizer in self.optimizers:
            if hooks.unscale_gradients is not None:
                hooks.unscale_gradients(trainer=trainer, optimizer=optimizer)
            if hooks.on_before_optimizer_step is not None:
                hooks.on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
            if clip is not None:
                norm = hooks.clip_gradients(trainer=trainer, optimizer=optimizer, max_norm=clip)
                if norm is not None:
                    self.log("grad_norm", norm)
            if hooks.optimizer_step(trainer=trainer, optimizer=optimizer) is False:
                stepped_all = False
        self.last_step_skipped = not stepped_all
        if stepped_all:
            for entry in self._schedulers:
                if entry.interval == "step" and (self.global_step + 1) % entry.frequency == 0:
                    self._step_scheduler(entry)
        for optimizer in self.optimizers:
            if hooks.on_before_zero_grad is not None:
                hooks.on_before_zero_grad(trainer=trainer, optimizer=optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _step_scheduler(self, entry: _Scheduler) -> None:
        if entry.monitor is None:
            entry.scheduler.step()
            return
        if entry.monitor not in self.metrics:
            raise ConfigurationError(
                f"the LR scheduler monitors {entry.monitor!r}, which was never logged; "
                f"known metrics: {', '.join(sorted(self.metrics)) or 'none'}"
            )
        entry.scheduler.step(self.metrics[entry.monitor])

    def _check_finite(self) -> None:
        """Raise if any loss since the last check was NaN or infinite. Called where the
        loop reads values anyway (publishing, epoch end), so it adds no sync per step."""
        # Folding examines each loss once; stacking every pending loss at each check
        # cost more per step than the rest of the loop's bookkeeping together.
        finite = self._train_means.fold_finite("loss")
        if finite is None:
            return
        first, last = self._checked_steps_from, self.global_step
        self._checked_steps_from = last + 1
        if not bool(finite):
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite between global steps {first} and "
                f"{last} (epoch {self.current_epoch}); pass check_finite_every_step=True to "
                f"find the exact step"
            )

    def _agree_on_stop(self) -> None:
        # One process deciding to stop (a signal, early stopping) must stop all of
        # them at the same batch, or the others wait forever in the next collective.
        flag = torch.tensor([1.0 if self.should_stop else 0.0], device=self.device)
        self.should_stop = bool(self.all_reduce(flag).item() > 0)

    def _apply_pending_rng(self) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _add_metric_values(
        self, means: RunningMeans, prefix: str, outputs: Any, targets: Any, gathered: bool
    ) -> None:
        size = _batch_size(outputs)
        with torch.no_grad():
            for name, fn in self.metric_fns.items():
                full = prefix + name
                value = fn(
                    outputs.detach() if isinstance(outputs, torch.Tensor) else outputs, targets
                )
                means.add(full, value, size)
                self.metrics.set(full, value)
                if gathered:
                    means.global_names.add(full)

    # ------------------------------------------------------------------ evaluation

    def _run_validation_in_fit(self) -> None:
        # Validation must not change training: its dataloader draws seeds from the
        # global RNG, so the RNG is saved and put back around it.
        state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            self._evaluation_loop("validate", self.eval_dataloaders)
        finally:
            torch.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        self.model.train()

    def _evaluate(
        self,
        stage: str,
        model: nn.Module,
        dataloaders: Any,
        loss_fn: Callable[..., torch.Tensor] | None,
        metrics: Mapping[str, MetricFn] | None,
    ) -> dict[str, Any]:
        self._check_model(model, training=False)
        loaders = self._as_loader_list("dataloaders", dataloaders)
        if not loaders:
            raise ConfigurationError(f"{stage}() needs at least one dataloader")
        self._begin(model, loss_fn, metrics)
        self.eval_dataloaders = loaders

        def body() -> dict[str, Any]:
            self.plugin_manager.hook.prepare(trainer=self, stage=stage)
            self._hooks = _ResolvedHooks(self.plugin_manager, self._defaults)
            return self._evaluation_loop(stage, self.eval_dataloaders)

        return self._run_stage(stage, body)

    def _evaluation_loop(self, stage: str, loaders: Sequence[Iterable[Any]]) -> dict[str, Any]:
        hooks = self._hooks
        names = _EVAL_STAGES[stage]
        prefix = names["prefix"]
        on_batch_start = getattr(hooks, names["batch_start"])
        on_batch_end = getattr(hooks, names["batch_end"])
        transfer = hooks.transfer_batch_to_device
        forward = hooks.forward_step
        gather = hooks.gather_for_metrics
        limit = self.limits[stage]
        model = self.model
        model.eval()
        self.num_eval_batches = [_limited_length(loader, limit) for loader in loaders]
        means = RunningMeans()
        predictions: list[Any] = []
        previous_means, previous_prefix = self._active_means, self._log_prefix
        self._active_means, self._log_prefix = means, prefix
        try:
            with torch.no_grad():
                if getattr(hooks, names["start"]) is not None:
                    getattr(hooks, names["start"])(trainer=self)
                if getattr(hooks, names["epoch_start"]) is not None:
                    getattr(hooks, names["epoch_start"])(trainer=self)
                for loader_idx, loader in enumerate(loaders):
                    suffix = f"/dataloader_idx_{loader_idx}" if len(loaders) > 1 else ""
                    iterable = hooks.batch_iterator(
                        trainer=self, dataloader=loader, stage=stage, skip_batches=0
                    )
                    if limit is not None:
                        iterable = itertools.islice(iterable, limit)
                    for batch_idx, batch in enumerate(iterable):
                        batch = transfer(trainer=self, batch=batch, device=self.device)
                        if on_batch_start is not None:
                            on_batch_start(
                                trainer=self,
                                batch=batch,
                                batch_idx=batch_idx,
                                dataloader_idx=loader_idx,
                            )
                        self._batch_size = _batch_size(batch)
                        outputs = forward(
                            trainer=self, batch=batch, batch_idx=batch_idx, stage=stage
                        )
                        if stage == "predict":
                            predictions.append(outputs)
                        else:
                            self._accumulate_eval(means, prefix, suffix, outputs, gather)
                        if on_batch_end is not None:
                            on_batch_end(
                                trainer=self,
                                outputs=outputs,
                                batch=batch,
                                batch_idx=batch_idx,
                                dataloader_idx=loader_idx,
                            )
                results = means.compute(self.all_reduce if self.world_size > 1 else None)
                self.metrics.update_raw(results)
                if stage == "predict":
                    if getattr(hooks, names["epoch_end"]) is not None:
                        getattr(hooks, names["epoch_end"])(trainer=self, predictions=predictions)
                elif getattr(hooks, names["epoch_end"]) is not None:
                    getattr(hooks, names["epoch_end"])(trainer=self)
                if getattr(hooks, names["end"]) is not None:
                    getattr(hooks, names["end"])(trainer=self)
        finally:
            self._active_means, self._log_prefix = previous_means, previous_prefix
        if stage == "predict":
            return {"predictions": predictions}
        self._publish(results, stage)
        return self.metrics.floats(results)

    def _accumulate_eval(
        self, means: RunningMeans, prefix: str, suffix: str, outputs: Any, gather: Any
    ) -> None:
        if isinstance(outputs, torch.Tensor):
            means.add(prefix + "loss" + suffix, outputs.detach(), self._batch_size)
            return
        if not isinstance(outputs, Mapping):
            return  # a step that returned None logged what it wanted itself
        if "outputs" in outputs and "targets" in outputs:
            predicted, targets = outputs["outputs"], outputs["targets"]
            gathered = False
            if gather is not None:
                result = gather(trainer=self, outputs=predicted, targets=targets)
                if result is not None:
                    predicted, targets = result
                    gathered = True
            size = _batch_size(predicted)
            if "loss" not in outputs and self.loss_fn is not None:
                name = prefix + "loss" + suffix
                means.add(name, self.loss_fn(predicted, targets).detach(), size)
                if gathered:
                    means.global_names.add(name)
            with torch.no_grad():
                for metric, fn in self.metric_fns.items():
                    name = prefix + metric + suffix
                    means.add(name, fn(predicted, targets), size)
                    if gathered:
                        means.global_names.add(name)
        for key, value in outputs.items():
            if key in ("outputs", "targets"):
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                means.add(prefix + key + suffix, value.detach(), self._batch_size)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                means.add(prefix + key + suffix, float(value), self._batch_size)


# ---------------------------------------------------------------------- helpers


def _move_module(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)``, skipped when every parameter and buffer is there
    already: ``to`` rebuilds every tensor's wrapper through a recursive walk, a
    tenth of a millisecond a stage for a small model, for nothing."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device != device:
            module.to(device)
            return


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _limited_length(loader: Any, limit: int | None) -> int | None:
    length = _length(loader)
    if limit is not None:
        length = limit if length is None else min(length, limit)
    return length


def _require_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _loss_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
        if isinstance(loss, torch.Tensor):
            return loss
    raise ConfigurationError(
        f"the training step must return the loss tensor or a dict holding 'loss', "
        f"got {type(outputs).__name__}"
    )


def _raise_bad_loss(loss: torch.Tensor) -> None:
    if loss.ndim != 0:
        raise ConfigurationError(
            f"the loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; "
            f"reduce it (reduction='mean') before returning it"
        )
    raise ConfigurationError(
        "the loss does not require grad: it was detached, computed under torch.no_grad(), "
        "or the model's parameters do not take part in it"
    )


def _load_model_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append("missing from the checkpoint: " + ", ".join(missing))
        if unexpected:
            lines.append("not in the model: " + ", ".join(unexpected))
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched))
        raise ConfigurationError(
            f"the checkpoint does not fit {type(module).__name__}:\n  " + "\n  ".join(lines)
        )
    module.load_state_dict(state)


def _parse_optimizer_config(config: Any) -> tuple[list[Any], list[_Scheduler]]:
    """Read what ``configure_optimizers`` returned: an optimizer, a list of them, a
    pair ``([optimizers], [schedulers])``, or a dict (or list of dicts) with
    ``"optimizer"`` and ``"lr_scheduler"`` (a scheduler, or a dict with
    ``"scheduler"``, ``"interval"``, ``"frequency"`` and ``"monitor"``)."""

    def scheduler_entry(item: Any) -> _Scheduler:
        if isinstance(item, Mapping):
            return _Scheduler(
                item["scheduler"],
                item.get("interval", "epoch"),
                int(item.get("frequency", 1)),
                item.get("monitor"),
            )
        monitor = "val_loss" if type(item).__name__ == "ReduceLROnPlateau" else None
        return _Scheduler(item, "epoch", 1, monitor)

    if isinstance(config, torch.optim.Optimizer):
        return [config], []
    if isinstance(config, Mapping):
        config = [config]
    if (
        isinstance(config, tuple | list)
        and len(config) == 2
        and isinstance(config[0], list | tuple)
        and isinstance(config[1], list | tuple)
    ):
        return list(config[0]), [scheduler_entry(s) for s in config[1]]
    if isinstance(config, list | tuple):
        optimizers, schedulers = [], []
        for item in config:
            if isinstance(item, Mapping):
                optimizers.append(item["optimizer"])
                if item.get("lr_scheduler") is not None:
                    entry = scheduler_entry(item["lr_scheduler"])
                    if entry.monitor is None and "monitor" in item:
                        entry.monitor = item["monitor"]
                    schedulers.append(entry)
            else:
                optimizers.append(item)
        return optimizers, schedulers
    raise ConfigurationError(
        f"configure_optimizers() returned {type(config).__name__}; return an optimizer, a "
        f"list of them, ([optimizers], [schedulers]) or a dict with 'optimizer'"
    )
