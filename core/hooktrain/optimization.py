"""Optimizers and learning-rate schedulers: building them, and one optimizer step.

`configure_optimizers` reads what the user gave (an optimizer, a callable taking
the parameters, or the model's own ``configure_optimizers``). `make_optimizer_step`
builds, once per stage, the function the loop calls when a gradient-accumulation
window is complete.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from hooktrain.errors import (
    ConfigurationError,
    ResumeWarning,
    closest_name,
    missing_monitor_hint,
    warn_user,
)
from hooktrain.results import unexpected_result

if TYPE_CHECKING:
    from hooktrain.hookcalls import ResolvedHooks
    from hooktrain.trainer import Trainer

__all__ = [
    "Scheduler",
    "check_optimizers_hold_the_model",
    "check_unchanged_since_prepare",
    "configure_optimizers",
    "learning_rates",
    "make_optimizer_step",
    "parse_optimizer_config",
    "warn_if_learning_rate_changed",
]


class Scheduler:
    """An LR scheduler with when to step it.

    :ivar interval: ``"step"`` (after optimizer steps) or ``"epoch"`` (after epochs).
    :ivar frequency: step it every this many intervals.
    :ivar monitor: the metric passed to ``scheduler.step(value)`` (a plateau
        scheduler); such a scheduler steps only after epochs that computed it.
    """

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


def configure_optimizers(module: torch.nn.Module, optimizer: Any) -> tuple[list[Any], list[Any]]:
    """The optimizers and `Scheduler` entries of a run.

    :param optimizer: an optimizer, a callable taking the parameters, or ``None``
        to ask ``module.configure_optimizers()``.
    :raises ConfigurationError: when there is no optimizer, something else was
        given where an optimizer belongs, or both ``optimizer`` and the module's
        ``configure_optimizers`` (one of them would be dropped without a word).
    """
    schedulers: list[Scheduler] = []
    own = callable(getattr(module, "configure_optimizers", None))
    if optimizer is not None and own:
        raise ConfigurationError(
            f"fit() was given optimizer=... and the model ({type(module).__name__}) defines "
            f"configure_optimizers(): give one of them (the model's may return LR "
            f"schedulers too)"
        )
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
    elif own:
        optimizers, schedulers = parse_optimizer_config(module.configure_optimizers())
    else:
        raise ConfigurationError(
            "fit() needs optimizer=... (an optimizer or a callable taking the parameters), "
            "or a configure_optimizers() method on the model"
        )
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigurationError(f"expected an optimizer, got {type(opt).__name__}")
    return optimizers, schedulers


def check_optimizers_hold_the_model(module: torch.nn.Module, optimizers: list[Any]) -> None:
    """Refuse an optimizer that would step other tensors while the model never
    changes. Called after ``prepare``, where a plugin may have rebound a ready-made
    optimizer to parameters it replaced (fsdp's sharded ones).

    :raises ConfigurationError: when an optimizer holds none of ``module``'s
        parameters (built over another model, or a copy of this one).
    """
    own = {id(p) for p in module.parameters()}
    for opt in optimizers:
        held = [p for group in opt.param_groups for p in group["params"]]
        if held and not any(id(p) in own for p in held):
            raise ConfigurationError(
                f"the optimizer ({type(opt).__name__}) holds none of the model's "
                f"parameters: it was built over another model, or a copy of this one. "
                f"Build it over model.parameters(), or pass a callable taking them "
                f"(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))"
            )


def check_unchanged_since_prepare(trainer: Trainer, prepared: tuple[Any, list[Any]]) -> None:
    """Refuse a model or optimizers replaced once ``prepare`` has run (in
    ``on_fit_start``, an epoch's or a batch's hook). The fit's step was built from
    ``prepared`` (the model and the optimizers as ``prepare`` left them) and would go
    on stepping those, the change unseen: an emptied optimizer list trained nothing.
    Called as each epoch starts and as the fit ends.

    :raises ConfigurationError: naming what changed, and where to change it instead.
    """
    model, optimizers = prepared
    changed = [] if trainer.model is model else ["trainer.model"]
    if len(trainer.optimizers) != len(optimizers) or any(
        a is not b for a, b in zip(trainer.optimizers, optimizers, strict=False)
    ):
        changed.append("trainer.optimizers")
    if changed:
        raise ConfigurationError(
            f"{' and '.join(changed)} replaced during fit, after prepare (found at epoch "
            f"{trainer.current_epoch}, global step {trainer.global_step}): the fit steps "
            f"the model and optimizers that prepare left, and would not see the change. "
            f"Replace them in a setup or prepare implementation, or pass them to fit()"
        )


def parse_optimizer_config(config: Any) -> tuple[list[Any], list[Scheduler]]:
    """Read what ``configure_optimizers`` returned: an optimizer, a list of them, a
    pair ``([optimizers], [schedulers])``, or a dict (or list of dicts) with
    ``"optimizer"`` and ``"lr_scheduler"`` (a scheduler, or a dict with
    ``"scheduler"``, ``"interval"``, ``"frequency"`` and ``"monitor"``; Lightning's
    ``"name"`` is accepted and not used).

    A ``ReduceLROnPlateau`` (or a subclass) given without a monitor monitors
    ``val_loss``, as in Lightning.

    :raises ConfigurationError: for a dict key hooktrain does not read (a misspelt
        ``"lr_scheduler"`` would leave its scheduler never stepped), a dict without
        ``"optimizer"`` (or ``"scheduler"``), or a value of another form.
    """

    def scheduler_entry(item: Any) -> Scheduler:
        if isinstance(item, Mapping):
            _check_keys(item, _SCHEDULER_KEYS, "an lr_scheduler dict", required="scheduler")
            return Scheduler(
                item["scheduler"],
                item.get("interval", "epoch"),
                int(item.get("frequency", 1)),
                item.get("monitor", _default_monitor(item["scheduler"])),
            )
        return Scheduler(item, "epoch", 1, _default_monitor(item))

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
                _check_keys(item, _CONFIG_KEYS, "a configure_optimizers() dict", "optimizer")
                optimizers.append(item["optimizer"])
                if item.get("lr_scheduler") is not None:
                    entry = scheduler_entry(item["lr_scheduler"])
                    if "monitor" in item:
                        entry.monitor = item["monitor"]
                    schedulers.append(entry)
            else:
                optimizers.append(item)
        return optimizers, schedulers
    raise ConfigurationError(
        f"configure_optimizers() returned {type(config).__name__}; return an optimizer, a "
        f"list of them, ([optimizers], [schedulers]) or a dict with 'optimizer'"
    )


_CONFIG_KEYS = ("optimizer", "lr_scheduler", "monitor")
_SCHEDULER_KEYS = ("scheduler", "interval", "frequency", "monitor", "name")


def _check_keys(item: Mapping[str, Any], known: tuple[str, ...], what: str, required: str) -> None:
    """:raises ConfigurationError: for a key not in ``known`` (a misspelt
    ``"lr_scheduler"`` would leave the scheduler never stepped), or a missing
    ``required`` one."""
    for key in item:
        if key not in known:
            close = closest_name(key, known)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ConfigurationError(
                f"{what} has the key {key!r}, which hooktrain does not read.{hint} "
                f"Its keys are {', '.join(map(repr, known))}"
            )
    if required not in item:
        raise ConfigurationError(f"{what} needs the key {required!r}; it has {sorted(item)}")


def _default_monitor(scheduler: Any) -> str | None:
    return "val_loss" if isinstance(scheduler, ReduceLROnPlateau) else None


def make_optimizer_step(trainer: Trainer, hooks: ResolvedHooks) -> Callable[[int], None]:
    """Build the function that ends a gradient-accumulation window.

    The returned ``optimizer_step(micro_batches)`` is called with the number of
    micro-batches the window really held. Each micro-batch's loss was divided by
    ``accumulate_grad_batches`` before backward; a shorter window (the last one of
    an epoch) has its gradients multiplied by ``accumulate_grad_batches /
    micro_batches``, so that every window's gradient is the mean over its own
    micro-batches. Then, for each optimizer: ``unscale_gradients``,
    ``on_before_optimizer_step``, ``clip_gradients`` (with ``gradient_clip_val``),
    ``optimizer_step``; the step-wise LR schedulers that monitor no metric (when no
    optimizer skipped its step); for each optimizer ``on_before_zero_grad`` and ``zero_grad``; and
    ``trainer.global_step`` grows by one.
    """
    optimizers = trainer.optimizers
    # Monitoring ones step after the step's validation: `step_monitoring_schedulers`.
    step_schedulers = [
        entry for entry in trainer._schedulers if entry.interval == "step" and entry.monitor is None
    ]
    accumulate = trainer.accumulate_grad_batches
    clip = trainer.gradient_clip_val
    unscale = hooks.unscale_gradients
    on_before_optimizer_step = hooks.on_before_optimizer_step
    clip_gradients = hooks.clip_gradients
    step = hooks.optimizer_step
    on_before_zero_grad = hooks.on_before_zero_grad

    def optimizer_step(micro_batches: int) -> None:
        if micro_batches != accumulate:
            _scale_gradients(optimizers, accumulate / micro_batches)
        stepped_all = True
        norms = []
        for optimizer in optimizers:
            if unscale is not None:
                unscale(trainer=trainer, optimizer=optimizer)
            if on_before_optimizer_step is not None:
                on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
            if clip is not None:
                norm = clip_gradients(trainer=trainer, optimizer=optimizer, max_norm=clip)
                if norm is not None:
                    # bool is an int, and True is what other compute hooks return.
                    if isinstance(norm, bool) or not isinstance(norm, torch.Tensor | float | int):
                        raise unexpected_result(
                            trainer.plugin_manager, "clip_gradients", norm, "the norm or None"
                        )
                    norms.append(norm)
            stepped = step(trainer=trainer, optimizer=optimizer)
            if stepped is not True:
                if stepped is not False:
                    raise unexpected_result(
                        trainer.plugin_manager, "optimizer_step", stepped, "True or False"
                    )
                stepped_all = False
        # A skipped step's norm is infinite or NaN (why a gradient scaler skipped
        # it): kept, it would make the epoch's mean so, where the steps taken had a
        # finite one. ``last_step_skipped`` tells of the skip.
        if norms and stepped_all:
            # One value a step, over every optimizer's parameters, as with one.
            total = norms[0] if len(norms) == 1 else sum(n**2 for n in norms) ** 0.5
            # A step's value, not its batch's: the epoch's mean counts each step once.
            trainer.log("grad_norm", total, batch_size=1)
        trainer.last_step_skipped = not stepped_all
        if stepped_all:
            for entry in step_schedulers:
                if (trainer.global_step + 1) % entry.frequency == 0:
                    step_scheduler(trainer, entry, None)
        for optimizer in optimizers:
            if on_before_zero_grad is not None:
                on_before_zero_grad(trainer=trainer, optimizer=optimizer)
            optimizer.zero_grad(set_to_none=True)
        trainer.global_step += 1

    return optimizer_step


def _scale_gradients(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    grads = [
        p.grad
        for optimizer in optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if grads:
        torch._foreach_mul_(grads, factor)


def step_monitoring_schedulers(trainer: Trainer) -> None:
    """Step the step-wise schedulers that monitor a metric (a plateau scheduler),
    once the optimizer step and the validation due at it are done: one monitoring
    ``val_loss`` every N steps is then judged on the validation of those weights,
    as in Lightning, instead of failing before any validation ran. Skipped after
    a step an optimizer skipped."""
    if trainer.last_step_skipped:
        return
    for entry in trainer._schedulers:
        if (
            entry.interval == "step"
            and entry.monitor is not None
            and trainer.global_step % entry.frequency == 0
        ):
            step_scheduler(trainer, entry, None)


def step_scheduler(
    trainer: Trainer, entry: Scheduler, computed: Collection[str] | None, validated: bool = False
) -> None:
    """Step one scheduler; a monitoring one is given its metric's value.

    :param computed: the metric names computed since the scheduler last had the
        chance to step (an epoch's training and validation metrics), or ``None``
        for a step-wise scheduler. A monitoring scheduler whose metric is not among
        them does not step when validation did not run in the epoch: a plateau is
        judged only on values the epoch computed (at its end, or at a step inside
        it), and epochs that skip validation (``check_val_every_n_epoch``) have none.
    :param validated: whether validation ran in this epoch (at its end or at a
        step inside it).
    :raises ConfigurationError: when the monitored metric is missing although
        validation ran (a misspelt name, a ``validation_step`` that returns
        nothing), naming those computed.
    """
    monitor = entry.monitor
    if monitor is not None and computed is not None and monitor not in computed:
        if not validated:
            return
        hint = missing_monitor_hint(monitor, computed)
        raise ConfigurationError(
            f"the LR scheduler monitors {monitor!r}, which this epoch did not compute; "
            f"computed: {', '.join(sorted(computed)) or 'none'}" + (f". {hint}" if hint else "")
        )
    if monitor is not None and monitor not in trainer.metrics:
        raise ConfigurationError(
            f"the LR scheduler monitors {monitor!r}, which was never logged; "
            f"known metrics: {', '.join(sorted(trainer.metrics)) or 'none'}"
        )
    args = () if monitor is None else (trainer.metrics[monitor],)
    if trainer.global_step != trainer._fit_start_step:
        entry.scheduler.step(*args)
        return
    # A run resumed at an epoch's last batch steps the epoch's schedulers before this
    # process stepped an optimizer: the order is right, and torch warns that it is
    # not. The filter is set only here: entering catch_warnings makes Python show
    # every once-only warning again.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
        entry.scheduler.step(*args)


def learning_rates(optimizers: list[Any]) -> list[list[float | None]]:
    """Each optimizer's learning rates, one per parameter group (``None`` for a rate
    that is not a number, such as a tensor)."""
    return [
        [
            lr if isinstance(lr := group.get("lr"), int | float) else None
            for group in opt.param_groups
        ]
        for opt in optimizers
    ]


def warn_if_learning_rate_changed(configured: list[Any], saved: Any) -> None:
    """Warn (`hooktrain.ResumeWarning`) when a resume's script configured another
    learning rate than the run that saved the checkpoint (``saved``, its
    ``configured_lrs``; ``None`` for a checkpoint without them): loading the
    optimizers' state puts the saved rates back, and training goes on with them.

    Both are the rates as ``configure_optimizers`` (or ``optimizer=``) left them
    when each fit started, so a rate that a scheduler or a warm-up plugin moved
    since does not count as a change.
    """
    if not isinstance(saved, list):
        return
    for index, (given, kept) in enumerate(zip(configured, saved, strict=False)):
        for new, old in zip(given, kept, strict=False):
            if new is not None and old is not None and new != old:
                warn_user(
                    f"hooktrain: resuming with a learning rate of {new:g} for optimizer "
                    f"{index}, where the run that saved the checkpoint was given {old:g}: "
                    f"loading the optimizer's state put that run's rate back, and "
                    f"training goes on with it. To change the rate of a resumed run, "
                    f"configure the checkpoint's rate and set the new one in an "
                    f"on_fit_start hook, which runs after the checkpoint is loaded "
                    f"(param_group['lr'], and an LR scheduler's base_lrs)",
                    ResumeWarning,
                )
                return
