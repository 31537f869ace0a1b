"""What a run is given, checked before any work is done: the `Trainer`'s options
when it is built (and, for what depends on the data, when ``fit`` starts), and the
model, dataloaders, loss and metrics each entry point gets; and the options as
recorded for loggers (the run's hyperparameters)."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.batches import length, limited_length, unwrap_compiled, user_method
from hooktrain.epoch_metrics import is_epoch_metric
from hooktrain.errors import ConfigurationError, warn_user
from hooktrain.hookcalls import HOOK_NAMES
from hooktrain.results import implementers
from hooktrain.roles import exclusive_roles

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = [
    "check_loader",
    "check_loss_fn",
    "check_metrics",
    "check_model",
    "check_monitors",
    "check_options",
    "default_device",
    "loader_list",
    "refuse_manual_optimization",
    "resolve_device",
    "trainer_hparams",
    "warn_if_fit_ends_too_soon",
    "why_evaluation_computed_nothing",
    "why_fit_never_validates",
]

# The option that sets each stage's ``trainer.limits`` entry.
_LIMIT_OPTIONS = {
    "train": "limit_train_batches",
    "validate": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}


def check_options(
    *,
    plugins: Any,
    max_epochs: Any,
    max_steps: Any,
    seed: Any,
    accumulate_grad_batches: Any,
    gradient_clip_val: Any,
    check_val_every_n_epoch: Any,
    val_every_n_steps: Any,
    limits: Mapping[str, Any],
    log_every_n_steps: Any,
    check_finite_every_step: Any,
) -> None:
    """Refuse options that cannot run, before anything else happens.

    :param limits: the ``limit_*_batches`` options, by stage (``"train"``,
        ``"validate"``, ``"test"``, ``"predict"``).
    :raises ConfigurationError: for a count that is not an integer in its range
        (``max_epochs``, ``accumulate_grad_batches``, ``check_val_every_n_epoch`` and
        ``log_every_n_steps`` >= 1; ``max_steps``, ``val_every_n_steps`` and
        ``limit_train_batches`` >= 1 or ``None``; the other limits and ``seed`` >= 0
        or ``None``), a ``gradient_clip_val`` that is not a number > 0, a
        ``check_finite_every_step`` that is not a bool, or ``plugins`` that is not a
        list.
    """
    _require_int("max_epochs", max_epochs, minimum=1)
    _require_int("max_steps", max_steps, minimum=1, optional=True)
    _require_int("seed", seed, minimum=0, optional=True)
    _require_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
    _require_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
    _require_int("val_every_n_steps", val_every_n_steps, minimum=1, optional=True)
    _require_int("log_every_n_steps", log_every_n_steps, minimum=1)
    for stage, value in limits.items():
        # No training batch at all would end the first epoch with "yielded no batches".
        minimum = 1 if stage == "train" else 0
        _require_int(_LIMIT_OPTIONS[stage], value, minimum=minimum, optional=True)
    if gradient_clip_val is not None and (
        isinstance(gradient_clip_val, bool)
        or not isinstance(gradient_clip_val, int | float)
        or not gradient_clip_val > 0
    ):
        raise ConfigurationError(
            f"gradient_clip_val must be a number > 0, got {gradient_clip_val!r}"
        )
    if not isinstance(check_finite_every_step, bool):
        raise ConfigurationError(
            f"check_finite_every_step must be True or False, got {check_finite_every_step!r}"
        )
    if plugins is not None and (
        isinstance(plugins, str | bytes) or not isinstance(plugins, Sequence)
    ):
        raise ConfigurationError(
            f"plugins must be a list (of names, objects or (name, options) pairs), got {plugins!r}"
        )


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; `default_device` when ``None``.

    :raises ConfigurationError: for a name torch does not know, or a CUDA or MPS
        device this torch cannot use (a CPU-only build, no GPU, an index past the
        last GPU), here rather than at the first tensor moved.
    """
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"device {device!r} is not a torch device: {exc}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise ConfigurationError(
                f"device {device!r}, but this torch sees {count} CUDA device(s) "
                f"(torch {torch.__version__}); pass device='cpu', or leave device unset "
                f"to use a GPU when there is one"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device {device!r}, but MPS is not available here")
    return resolved


def check_metrics(metrics: Any) -> None:
    """:raises ConfigurationError: when ``metrics`` is not ``None`` nor a mapping of
    names to callables (``fn(outputs, targets)``) or epoch metrics (a
    ``torchmetrics.Metric``, any object with ``update``, ``compute`` and ``reset``)."""
    if metrics is None:
        return
    example = "metrics={'acc': hooktrain.accuracy}"
    if not isinstance(metrics, Mapping):
        raise ConfigurationError(
            f"metrics must be a dict of names to metrics ({example}), got {type(metrics).__name__}"
        )
    for name, fn in metrics.items():
        if not isinstance(name, str) or not (callable(fn) or is_epoch_metric(fn)):
            raise ConfigurationError(
                f"metrics[{name!r}] must be a function of (outputs, targets) or a "
                f"torchmetrics Metric under a string name ({example}), got "
                f"{type(fn).__name__}"
            )
        torchmetrics = sys.modules.get("torchmetrics")  # imported by whoever built one
        if torchmetrics is not None and isinstance(fn, torchmetrics.MetricCollection):
            raise ConfigurationError(
                f"metrics[{name!r}] is a MetricCollection, whose compute() returns a dict; "
                f"give each of its metrics its own name in metrics="
            )
        # The loop's own names: "loss" would be averaged with the training loss (and
        # become val_loss); a prefixed one would hold the training value under a
        # validation or test name.
        if name == "loss" or name.startswith(("val_", "test_")):
            raise ConfigurationError(
                f"metrics name {name!r} is one the loop gives its own values ('loss', and "
                f"the val_ and test_ prefixes it adds in evaluation); name the metric "
                f"without them ({example} is logged as acc, val_acc and test_acc)"
            )


def check_loss_fn(loss_fn: Any) -> None:
    """:raises ConfigurationError: when ``loss_fn`` is neither ``None`` nor callable (a
    loss's name as a string, Keras's habit), or is a module class
    (``nn.CrossEntropyLoss`` for ``nn.CrossEntropyLoss()``)."""
    if isinstance(loss_fn, type) and issubclass(loss_fn, torch.nn.Module):
        # Callable, so it would be called with (outputs, targets) as its constructor's
        # arguments and fail deep in the first step, or return a module, not a loss.
        raise ConfigurationError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, "
            f"loss_fn={loss_fn.__name__}()"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigurationError(
            f"loss_fn must be a function of (outputs, targets) returning the loss, such as "
            f"torch.nn.functional.cross_entropy or torch.nn.CrossEntropyLoss(), got "
            f"{type(loss_fn).__name__} {loss_fn!r:.40}"
        )


def why_fit_never_validates(trainer: Trainer) -> str | None:
    """Why this fit's configuration never computes a validation metric, in words
    that end a sentence ("... but <why>"); ``None`` when it validates. For a check
    that refuses, before training, a monitor of a ``val_*`` metric (the core's LR
    schedulers, the ``early_stopping`` plugin)."""
    if not trainer.eval_dataloaders:
        return "fit() was given no val_dataloaders"
    if trainer.limits["validate"] == 0:
        return "limit_val_batches=0 turns validation off"
    if trainer.val_every_n_steps is None and trainer.check_val_every_n_epoch > trainer.max_epochs:
        return (
            f"validation never runs (check_val_every_n_epoch="
            f"{trainer.check_val_every_n_epoch} exceeds max_epochs={trainer.max_epochs} "
            f"and val_every_n_steps is not set)"
        )
    return None


def why_evaluation_computed_nothing(trainer: Trainer, stage: str) -> str:
    """The error's words when ``validate()`` or ``test()`` computed no metric."""
    option = _LIMIT_OPTIONS[stage]
    if trainer.limits[stage] == 0:
        return f"{stage}() ran on no batch: {option}=0"
    step = "validation_step" if stage == "validate" else "test_step"
    return (
        f"{stage}() computed no metric: pass loss_fn=... or metrics=..., give the model "
        f"a {step} that returns a loss, or call it after a fit() that had a loss_fn"
    )


def check_monitors(trainer: Trainer) -> None:
    """Refuse, before training, a scheduler monitoring a validation metric that
    this run's configuration never computes."""
    why = why_fit_never_validates(trainer)
    if why is None:
        return
    for entry in trainer._schedulers:
        if entry.monitor and entry.monitor.startswith("val_"):
            raise ConfigurationError(
                f"an LR scheduler monitors {entry.monitor!r}, a validation metric, but {why}: "
                f"it would never step. Validate (pass val_dataloaders, validate more often), "
                f"or monitor a training metric"
            )


def warn_if_fit_ends_too_soon(trainer: Trainer) -> None:
    """Warn when the fit's length (known from the training loader's) ends it too
    soon for what was asked. When ``max_epochs`` ends it before ``max_steps``
    optimizer steps, as ``Trainer(max_steps=N)`` alone does with the default
    ``max_epochs=1`` (Lightning, whose default is 1000 epochs, trains the N steps).
    When a logger listens (a plugin implements ``log_metrics``) but the fit ends
    before the first log point, ``log_every_n_steps``, so that no step's values
    (the training loss curve) reach it (Lightning warns when an epoch is shorter
    than the interval)."""
    batches = limited_length(trainer.train_dataloader, trainer.limits["train"])
    if batches is None:
        return
    steps = trainer.max_epochs * -(-batches // trainer.accumulate_grad_batches)
    if trainer.max_steps is not None and steps < trainer.max_steps:
        warn_user(
            f"hooktrain: max_steps={trainer.max_steps} will not be reached: "
            f"max_epochs={trainer.max_epochs} ends the fit after {steps} optimizer steps "
            f"({batches} batches an epoch); raise max_epochs to train {trainer.max_steps}",
        )
    steps = min(steps, trainer.max_steps or steps)
    manager = trainer.plugin_manager
    # A progress bar shows the published values too, but draws no curve of them.
    loggers = [
        name
        for name in implementers(manager, "log_metrics")
        if "progress-bar" not in exclusive_roles(name, manager.get_plugin(name))
    ]
    if loggers and steps < trainer.log_every_n_steps:
        warn_user(
            f"hooktrain: log_every_n_steps={trainer.log_every_n_steps} is more than the "
            f"{steps} optimizer steps of this fit, so no step's values reach "
            f"{', '.join(map(repr, loggers))}, only the epochs'; set a lower "
            f"log_every_n_steps for step-wise curves",
        )


def warn_if_launched_but_alone(trainer: Trainer) -> None:
    """Warn when a launcher (torchrun, ``accelerate launch``) started this process as
    one of several (``WORLD_SIZE`` > 1 in its environment) but, after every plugin's
    ``setup``, ``trainer.world_size`` is still 1: no plugin made the run distributed,
    so each process trains its own copy of the model on all of the data."""
    launched = os.environ.get("WORLD_SIZE", "1")
    if trainer.world_size == 1 and launched.isdigit() and int(launched) > 1:
        warn_user(
            f"hooktrain: this process was launched as one of {launched} (WORLD_SIZE), but "
            f"no plugin made the run distributed (trainer.world_size is 1): each process "
            f"trains its own copy on all of the data. Select a plugin that distributes "
            f"the run (accelerate, fsdp), or start one process"
        )


def trainer_hparams(trainer: Trainer) -> dict[str, Any]:
    """``trainer``'s settings and plugin list, for loggers to record."""
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "seed": trainer.seed,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "val_every_n_steps": trainer.val_every_n_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
        "limit_train_batches": trainer.limits["train"],
        "limit_val_batches": trainer.limits["validate"],
        "device": str(trainer.device),
        "world_size": trainer.world_size,
        "plugins": list(trainer.plugin_names),
    }


def _require_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_model(model: Any, *, training: bool, plugin: bool = False) -> None:
    """:raises ConfigurationError: when ``model`` is not an ``nn.Module``, or (for
    training) has no parameter that requires grad. Warns when a model to train is
    in eval mode as a whole, and when the model defines methods named like event
    hooks (``on_train_epoch_end``), which run on plugins only, unless it is itself
    one of the trainer's plugins (``plugin``)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if training and not any(p.requires_grad for p in model.parameters()):
        raise ConfigurationError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True)"
        )
    if training:
        refuse_manual_optimization(model)
    # The event hooks only: a model's own setup() or load_checkpoint() is likely
    # its own method, not a hook.
    hooks = [
        n
        for n in HOOK_NAMES
        if not plugin and n.startswith("on_") and callable(getattr(type(model), n, None))
    ]
    if hooks:
        # A Lightning habit: hooks on the model. Here they would never run, and
        # the epoch metric they compute would go missing without a word.
        warn_user(
            f"hooktrain: {type(model).__name__} defines {', '.join(hooks)}, which hooktrain "
            f"never calls on a model: hooks run on plugins (a model gives only its "
            f"steps and configure_optimizers); move them into a plugin passed in "
            f"Trainer(plugins=[...])"
        )
    if training and not model.training:
        # The loop keeps each module's mode (a frozen BatchNorm stays frozen), so a
        # model left in eval() after a manual check would train with dropout off
        # and BatchNorm on its running statistics; Lightning calls train() instead.
        warn_user(
            f"hooktrain: {type(model).__name__} is in eval mode as fit starts, and trains "
            f"in the modes its modules are in (dropout off, BatchNorm frozen); call "
            f"model.train() first, and eval() only on the submodules to freeze"
        )


def refuse_manual_optimization(model: torch.nn.Module, optimizers: int | None = None) -> None:
    """Refuse Lightning's two ways of giving each optimizer its own update, which
    ported as they are would fail mid-step (``self.optimizers()``) or train every
    optimizer on one loss without a word.

    :param optimizers: how many the run has, once known (``None`` before): a
        ``training_step`` whose ``optimizer_idx`` has a default trains correctly
        with one.
    :raises ConfigurationError: for ``automatic_optimization = False``, or a
        ``training_step`` taking ``optimizer_idx`` without a default, or with one
        when there are several optimizers.
    """
    try:
        manual = getattr(model, "automatic_optimization", True) is False
    except Exception:  # a property that needs Lightning's own trainer
        manual = False
    step = user_method(model, "training_step")
    index = _parameters(step).get("optimizer_idx") if step is not None else None
    if manual:
        what = "sets automatic_optimization = False (Lightning's manual optimization)"
    elif index is not None and (index.default is index.empty or (optimizers or 0) > 1):
        what = "has a training_step taking optimizer_idx (Lightning 1.x's one step per optimizer)"
    else:
        return
    raise ConfigurationError(
        f"{type(unwrap_compiled(model)).__name__} {what}, which hooktrain does not have: "
        f"the core calls backward once on the loss the training step returns and then "
        f"steps every optimizer. Return one loss; updates that alternate between "
        f"optimizers (a GAN's) need a loop of your own"
    )


def _parameters(function: Any) -> Mapping[str, Any]:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def check_loader(what: str, loader: Any) -> None:
    """:raises ConfigurationError: when ``loader`` is not iterable, or its length
    says it yields nothing."""
    if loader is None or not isinstance(loader, Iterable) or isinstance(loader, str | bytes):
        raise ConfigurationError(
            f"{what} must be an iterable of batches (a DataLoader), got {type(loader).__name__}"
        )
    if length(loader) == 0:
        raise ConfigurationError(
            f"{what} is empty: it yields no batches (is the dataset empty, or "
            f"drop_last=True with fewer samples than batch_size?)"
        )


def loader_list(what: str, loaders: Any) -> list[Iterable[Any]]:
    """``loaders`` as a list of dataloaders: ``None`` or an empty list or tuple gives
    none, one loader gives a list of one, a list or tuple of loaders is copied; each
    is checked with `check_loader`.

    A list is one loader, a list of batches, when its first item is a batch
    (`_is_batch`): a tensor, a tuple, a dict, or a list holding no batches itself,
    as ``[inputs, targets]`` from a DataLoader's default collate. A list of
    DataLoaders, or of lists of batches, is several loaders.

    :raises ConfigurationError: for a dict of dataloaders (Lightning accepts one;
        here the names would be lost), or anything `check_loader` refuses.
    """
    if loaders is None or (isinstance(loaders, list | tuple) and not loaders):
        return []
    if isinstance(loaders, Mapping) and any(
        isinstance(v, Iterable) and not isinstance(v, torch.Tensor) for v in loaders.values()
    ):
        raise ConfigurationError(
            f"{what} got a dict of dataloaders ({', '.join(map(repr, loaders))}); pass a "
            f"list instead: metrics of loader i are logged with the suffix "
            f"'/dataloader_idx_i'"
        )
    if (
        isinstance(loaders, list | tuple)
        and loaders
        and all(
            isinstance(item, Iterable) and not isinstance(item, torch.Tensor) for item in loaders
        )
        and not _is_batch(loaders[0])
    ):
        result = list(loaders)
    else:
        result = [loaders]
    for index, loader in enumerate(result):
        # Of several, the one at fault is named by its index, as its metrics are.
        check_loader(f"{what}[{index}]" if len(result) > 1 else what, loader)
    return result


def _is_batch(item: Any) -> bool:
    """Whether ``item``, the first of a list passed as dataloaders, is a batch."""
    if isinstance(item, torch.Tensor | tuple | Mapping):
        return True
    # [inputs, targets] is a batch; [(inputs, targets), ...] a loader of them.
    return isinstance(item, list) and not (item and isinstance(item[0], tuple | list | Mapping))
