"""Training health for hooktrain: learning rate, gradient norm, throughput and peak
memory, put into ``trainer.metrics`` at each publish point and so sent to every
logger (TensorBoard, CSV, MLflow, the progress bar...).

Select it by name::

    Trainer(plugins=["tqdm", "tensorboard", "monitor"], log_every_n_steps=50)

At every optimizer step where the trainer publishes (``global_step`` a multiple of
``log_every_n_steps``) it logs, with ``trainer.log``:

* ``lr``: the first optimizer's first parameter group; with more optimizers or
  groups, also ``lr/<optimizer index>/<group index>`` for each. Read in
  ``on_before_optimizer_step``: the rate the step trained with, before a
  step-wise LR scheduler changes it for the next step;
* ``grad_norm``: the total 2-norm of the gradients of every optimizer's
  parameters, read in ``on_before_optimizer_step``, before any other plugin's
  implementation (after a precision plugin unscaled them, before
  ``gradient_clip_val`` clips them; with gradient
  accumulation, the whole window's gradients), and computed only at those steps.
  With ``gradient_clip_val`` the trainer itself logs this same norm at every
  step, so the monitor leaves it to the trainer: logging it twice at a publish
  step would count that step twice in the epoch's mean ``grad_norm``;
* ``samples_per_sec`` and ``steps_per_sec``: training samples (over every process)
  and optimizer steps per second since the previous publish point, validation
  inside ``fit`` excluded;
* ``max_memory_allocated`` (CUDA only): ``torch.cuda.max_memory_allocated``, bytes.

Nothing here reads the device: the gradient norm stays a tensor until the
trainer reads every published value in its one transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from hooktrain import Trainer

__all__ = ["Monitor"]
__version__ = "0.1.0"


class Monitor:
    """Logs ``lr``, ``grad_norm``, ``samples_per_sec``, ``steps_per_sec`` and, on
    CUDA, ``max_memory_allocated`` at each step where the trainer publishes.

    :param lr: log the learning rates.
    :param grad_norm: log the gradient norm before clipping.
    :param throughput: log ``samples_per_sec`` and ``steps_per_sec``.
    :param memory: log ``max_memory_allocated`` (bytes) when training on CUDA.
    :param clock: a function returning seconds; the default, ``time.perf_counter``,
        is monotonic. Tests pass a clock they advance themselves.
    :raises ConfigurationError: for an option that is not a bool, or a ``clock``
        that is not callable.
    """

    name = "monitor"

    def __init__(
        self,
        lr: bool = True,
        grad_norm: bool = True,
        throughput: bool = True,
        memory: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        for option, value in (
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("throughput", throughput),
            ("memory", memory),
        ):
            if not isinstance(value, bool):
                raise ConfigurationError(f"monitor: {option} must be True or False, got {value!r}")
        if not callable(clock):
            raise ConfigurationError(f"monitor: clock must be callable, got {clock!r}")
        self.lr = lr
        self.grad_norm = grad_norm
        self.throughput = throughput
        self.memory = memory
        self.clock = clock
        self._interval_start = 0.0
        self._paused = 0.0  # seconds of validation inside the current interval
        self._pause_start: float | None = None
        self._samples = 0
        self._steps = 0
        self._norm_step = -1
        self._squared_norm: torch.Tensor | None = None
        self._rates_step = -1
        self._rates: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Monitor(lr={self.lr}, grad_norm={self.grad_norm}, throughput={self.throughput}, "
            f"memory={self.memory})"
        )

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self._start_interval()

    # First: another plugin changing the gradients in this hook (a clipping or noise
    # plugin) would otherwise change the norm read, by the order plugins are listed.
    @hookimpl(tryfirst=True)
    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step + 1  # the step this optimizer is about to take
        if step % trainer.log_every_n_steps:
            return
        if self.lr and self._rates_step != step:
            # Before any optimizer of this step has stepped: schedulers step after
            # them all, so every group still holds the rate this step uses.
            self._rates_step, self._rates = step, _learning_rates(trainer.optimizers)
        if self.grad_norm and trainer.gradient_clip_val is None:
            self._add_norm(optimizer, step)

    def _add_norm(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full_tensor = getattr(norm, "full_tensor", None)
        if callable(full_tensor):
            # Sharded gradients (torch's DTensor, as under fsdp) give a norm in parts:
            # the whole one is a collective, made by every process at the same steps.
            norm = full_tensor()
        squared = norm**2
        if self._norm_step != step or self._squared_norm is None:
            # The first optimizer of this step: a fresh sum over the optimizers.
            self._norm_step, self._squared_norm = step, squared
        else:
            self._squared_norm = self._squared_norm + squared

    @hookimpl
    def on_validation_start(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            self._pause_start = self.clock()

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        if self._pause_start is not None:
            self._paused += self.clock() - self._pause_start
            self._pause_start = None

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        # A batch counts what it weighs in the epoch's means (the step's own
        # "batch_size", B of a time-major (T, B, F) batch), as the core sized it:
        # the batch itself may have been taken apart by the step.
        self._samples += trainer.batch_size
        if not trainer.sync_gradients:
            return  # inside an accumulation window: no optimizer step, no publication
        self._steps += 1
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        # trainer.log puts each value into trainer.metrics and into this step's
        # publication, so every logger receives it. These are values of the step, not
        # of its batch: with batch_size=1 every publication weighs the same in the
        # epoch's mean, a short last batch included.
        if self._rates_step == trainer.global_step:
            for name, value in self._rates.items():
                trainer.log(name, value, batch_size=1)
        self._rates = {}
        if self._squared_norm is not None and self._norm_step == trainer.global_step:
            trainer.log("grad_norm", self._squared_norm.sqrt(), batch_size=1)
        self._squared_norm = None
        if self.throughput:
            elapsed = self.clock() - self._interval_start - self._paused
            if elapsed > 0:
                trainer.log(
                    "samples_per_sec", self._samples * trainer.world_size / elapsed, batch_size=1
                )
                trainer.log("steps_per_sec", self._steps / elapsed, batch_size=1)
        if self.memory and trainer.device.type == "cuda":
            trainer.log(
                "max_memory_allocated",
                torch.cuda.max_memory_allocated(trainer.device),
                batch_size=1,
            )
        self._start_interval()

    def _start_interval(self) -> None:
        self._interval_start = self.clock()
        self._paused = 0.0
        self._samples = 0
        self._steps = 0


def _learning_rates(optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """``lr`` for the first optimizer's first group; every group as
    ``lr/<optimizer>/<group>`` as well when there is more than one. A value may be a
    tensor (a tensor learning rate): it is read with the other published values."""
    groups = [
        (i, j, group["lr"])
        for i, optimizer in enumerate(optimizers)
        for j, group in enumerate(optimizer.param_groups)
    ]
    if not groups:
        return {}
    # A tensor rate is copied: a scheduler updates it in place.
    groups = [(i, j, lr.clone() if isinstance(lr, torch.Tensor) else lr) for i, j, lr in groups]
    rates = {"lr": groups[0][2]}
    if len(groups) > 1:
        rates.update({f"lr/{i}/{j}": lr for i, j, lr in groups})
    return rates
