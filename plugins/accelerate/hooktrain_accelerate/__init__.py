"""Hugging Face ``accelerate`` for hooktrain, through hooks only.

Select it with ``Trainer(plugins=["accelerate"])`` (options as a pair:
``("accelerate", {"mixed_precision": "bf16"})``). The same script then runs

* on one process: ``python train.py``;
* distributed: ``torchrun --standalone --nproc_per_node 2 train.py`` or
  ``accelerate launch --multi_gpu --num_processes 2 train.py`` (on a machine
  without a GPU too: the plugin then trains on the CPU over gloo).

What each hook does:

* ``setup``: creates the :class:`accelerate.Accelerator` and sets
  ``trainer.device``, ``trainer.global_rank`` and ``trainer.world_size`` from it, so
  that every other plugin (progress bars, loggers, checkpoints) knows whether it
  is on the process that writes. A launched run that did not become distributed
  is an error, never N independent copies.
* ``prepare``: ``accelerator.prepare`` of the model, optimizers, LR schedulers and
  dataloaders; the trainer's attributes are replaced by the prepared objects.
* ``batch_iterator``: the epoch's shuffling order from the run's data seed and the
  epoch (the same on every process, and after a resume); a mid-epoch resume skips
  batches by index with ``accelerator.skip_first_batches``.
* ``forward_step`` (wrapper): a model's own ``training_step`` runs *through* the
  distributed wrapper, so gradients are synchronised; inside a
  gradient-accumulation window the forward runs under ``accelerator.no_sync``.
* ``backward``, ``clip_gradients``, ``optimizer_step``: the accelerator's versions.
* ``unscale_gradients``: also closes a window that ended only with the data (an
  iterable without a length): its gradients, gathered under ``no_sync``, are
  averaged over the processes, so that the optimizer steps.
* ``all_reduce``, ``all_gather_object`` (metric names) and ``gather_for_metrics``:
  metrics over every process, without the samples padding the last evaluation batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.batches import STEP_NAMES, skip_first_batches
from hooktrain.errors import ConfigurationError, PluginError
from hooktrain_accelerate.data import (
    refuse_hand_split_loaders,
    refuse_split_loaders,
    refuse_unsplittable_training_data,
    seed_sampler,
    started,
)
from hooktrain_accelerate.processes import create_accelerator

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from hooktrain import Trainer

__all__ = ["Accelerate"]
__version__ = "0.1.0"

_MIXED_PRECISION = ("no", "bf16", "fp16")


def _make_router(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``module`` in a module whose ``forward`` can be pointed at one of the
    module's own step methods.

    Distributed data parallel synchronises gradients only for computations that
    went through *its* ``forward``. A model with its own ``training_step`` is
    therefore wrapped in this router, the router is what accelerate wraps, and
    during a step the router's forward calls ``training_step`` (the same idea as
    Lightning's module wrapper). The user's module itself is left untouched.
    """
    from torch import nn

    class StepRouter(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner
            object.__setattr__(self, "route", None)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            route = self.route
            if route is None:
                return self.module(*args, **kwargs)
            return route(*args, **kwargs)

    return StepRouter(module)


class Accelerate:
    """Runs the loop through an :class:`accelerate.Accelerator`.

    :param mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``; ``None`` takes what
        ``accelerate launch --mixed_precision`` or ``accelerate config`` set (else
        ``"no"``). This plugin then owns precision: do not also select ``amp``.
    :param gradient_accumulation_steps: micro-batches per optimizer step. The
        core does the accumulation: this value becomes the trainer's
        ``accumulate_grad_batches`` (a different, explicit
        ``accumulate_grad_batches`` is an error). ``None`` takes
        ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` when set.
    :param cpu: force the CPU. ``None`` (default) means the CPU when the script was
        launched on several processes on a machine without a GPU, so that the
        processes join one gloo group instead of training independently.
    :param split_batches: ``True`` splits each batch of the dataloader across the
        processes (the global batch is the dataloader's batch size); ``False``
        (default) gives each process whole batches (the global batch is the
        dataloader's batch size times the number of processes).
    :param find_unused_parameters: passed to ``DistributedDataParallel``.
    :param accelerator_kwargs: further keyword arguments for ``Accelerator``.
    :raises ConfigurationError: here, for an option of the wrong kind or value; in
        ``setup``, for ``fp16`` on the CPU, before the process-wide Accelerator exists.
    """

    name = "accelerate"
    # The process group and the model's wrapper are the accelerator's, and so are
    # precision (its autocast, its scaler): a second plugin doing either is refused
    # when the Trainer is built.
    exclusive_roles = ("distributed", "precision")
    exclusive_role_hints = {
        "precision": "drop the other precision plugin and pass mixed_precision='bf16' or "
        "'fp16' to 'accelerate' instead.",
    }

    def __init__(
        self,
        mixed_precision: str | None = None,
        gradient_accumulation_steps: int | None = None,
        cpu: bool | None = None,
        split_batches: bool = False,
        find_unused_parameters: bool = False,
        accelerator_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if mixed_precision is not None and mixed_precision not in _MIXED_PRECISION:
            raise ConfigurationError(
                f"accelerate: mixed_precision must be one of {', '.join(_MIXED_PRECISION)} or "
                f"None, got {mixed_precision!r}"
            )
        if gradient_accumulation_steps is not None and (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, int)
            or gradient_accumulation_steps < 1
        ):
            raise ConfigurationError(
                f"accelerate: gradient_accumulation_steps must be an integer >= 1, got "
                f"{gradient_accumulation_steps!r}"
            )
        if cpu is not None and not isinstance(cpu, bool):
            raise ConfigurationError(f"accelerate: cpu must be True, False or None, got {cpu!r}")
        reserved = {
            "gradient_accumulation_steps",
            "gradient_accumulation_plugin",
            "step_scheduler_with_optimizer",
            "dataloader_config",
        }
        clash = sorted(reserved & set(accelerator_kwargs or {}))
        if clash:
            raise ConfigurationError(
                f"accelerate: accelerator_kwargs may not set {', '.join(clash)}: the plugin "
                f"sets them (use its own options)"
            )
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.cpu = cpu
        self.split_batches = split_batches
        self.find_unused_parameters = find_unused_parameters
        self.accelerator_kwargs = dict(accelerator_kwargs or {})
        #: The accelerator, created by the first ``setup`` and kept for later stages.
        self.accelerator: Accelerator | None = None
        self._router: Any = None
        self._own_eval_step = False
        # Indices of the evaluation loaders accelerate left unsplit.
        self._whole_sets: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"Accelerate(mixed_precision={self.mixed_precision!r}, "
            f"gradient_accumulation_steps={self.gradient_accumulation_steps!r})"
        )

    # ------------------------------------------------------------------ setup

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        self._reconcile_accumulation(trainer)
        if self.accelerator is None:
            self.accelerator = create_accelerator(
                cpu=self.cpu,
                mixed_precision=self.mixed_precision,
                split_batches=self.split_batches,
                find_unused_parameters=self.find_unused_parameters,
                accelerator_kwargs=self.accelerator_kwargs,
            )
        accelerator = self.accelerator
        import torch

        device = accelerator.device
        # "cpu:0" and "cpu" are one device, but would not compare equal.
        trainer.device = torch.device("cpu") if device.type == "cpu" else device
        trainer.global_rank = accelerator.process_index
        trainer.world_size = accelerator.num_processes

    def _reconcile_accumulation(self, trainer: Trainer) -> None:
        steps = self.gradient_accumulation_steps
        if steps is None:
            from_env = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
            steps = int(from_env) if from_env else 1
        if steps == 1 or trainer.accumulate_grad_batches == steps:
            return
        if trainer.accumulate_grad_batches != 1:
            raise ConfigurationError(
                f"accelerate: gradient_accumulation_steps={steps} (plugin option or "
                f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS) conflicts with "
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}); set one"
            )
        # The core divides the loss and decides when to step; the accelerator is
        # created with one step per window so that it divides nothing again.
        trainer.accumulate_grad_batches = steps

    # ------------------------------------------------------------------ prepare

    @hookimpl
    def prepare(self, trainer: Trainer, stage: str) -> None:
        accelerator = self.accelerator
        module = trainer.module
        # Around trainer.model, not the module: a model the user passed through
        # torch.compile keeps its compiled forward inside the DDP wrapper.
        self._router = _make_router(trainer.model)
        refuse_split_loaders([trainer.train_dataloader, *trainer.eval_dataloaders])
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            named = {
                f"evaluation dataloader {i}": d for i, d in enumerate(trainer.eval_dataloaders)
            }
            if stage == "fit":
                named = {"training dataloader": trainer.train_dataloader, **named}
            refuse_hand_split_loaders(named, lambda mine: gather_object([mine]))
        if stage == "fit":
            refuse_unsplittable_training_data(trainer.train_dataloader, accelerator)
            self._agree_on_data_seed(trainer)
            optimizers, schedulers = trainer.optimizers, trainer.lr_schedulers
            prepared = accelerator.prepare(
                self._router, *optimizers, *schedulers, trainer.train_dataloader
            )
            trainer.model = prepared[0]
            trainer.optimizers = list(prepared[1 : 1 + len(optimizers)])
            trainer.lr_schedulers = list(prepared[1 + len(optimizers) : -1])
            trainer.train_dataloader = prepared[-1]
            # Marked now, not at the first epoch: a resume counts the loader's
            # generators before that epoch starts, and would find one more than the
            # checkpoint holds.
            seed_sampler(trainer.train_dataloader, trainer.data_seed)
        else:
            trainer.model = accelerator.prepare(self._router)
        eval_step = STEP_NAMES["validate" if stage == "fit" else stage]
        self._own_eval_step = callable(getattr(module, eval_step, None))
        loaders = trainer.eval_dataloaders
        trainer.eval_dataloaders = self._prepare_eval_loaders(loaders, stage)
        # What accelerate cannot split (a list of batches, any iterable that is not
        # a DataLoader) it returns as it is: every process then holds the whole set.
        prepared = trainer.eval_dataloaders
        self._whole_sets = {i for i, given in enumerate(loaders) if prepared[i] is given}

    def _prepare_eval_loaders(self, loaders: list[Any], stage: str) -> list[Any]:
        """Shard the evaluation dataloaders.

        Per-sample outputs (a model without its own evaluation step) are gathered
        with ``gather_for_metrics``, which needs every process to see as many
        batches: the last ones are padded with repeated samples, which gathering
        removes again. A model's own evaluation step returns or logs batch means,
        where repeated samples could not be told apart: its dataloaders are split
        unevenly instead, and only the end-of-run sums are reduced (once per
        process, whatever its number of batches). ``predict`` gathers nothing and
        returns each process's own predictions, so its split is uneven too: padding
        would repeat samples there.
        """
        if not loaders:
            return []
        accelerator = self.accelerator
        accelerator.even_batches = not self._own_eval_step and stage != "predict"
        try:
            prepared = accelerator.prepare(*loaders)
        finally:
            accelerator.even_batches = True
        return list(prepared) if isinstance(prepared, tuple) else [prepared]

    def _agree_on_data_seed(self, trainer: Trainer) -> None:
        # Without Trainer(seed=...) each process drew its own data seed; rank 0's
        # wins, or the processes would shuffle differently and overlap.
        if trainer.world_size == 1:
            return
        import torch
        from accelerate.utils import broadcast

        seed = torch.tensor([trainer.data_seed], dtype=torch.int64, device=trainer.device)
        trainer.data_seed = int(broadcast(seed, from_process=0).item())

    # ------------------------------------------------------------------ data

    @hookimpl
    def batch_iterator(
        self, trainer: Trainer, dataloader: Iterable[Any], stage: str, skip_batches: int
    ) -> Iterable[Any] | None:
        from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

        if stage != "train" or not isinstance(dataloader, DataLoaderShard | DataLoaderDispatcher):
            return None  # the core's default handles evaluation and foreign iterables
        epoch = trainer.current_epoch
        seed_sampler(dataloader, trainer.data_seed)
        dataloader.set_epoch(epoch)
        if skip_batches <= 0:
            return started(dataloader)
        if getattr(dataloader, "num_workers", 0) > 0:
            # Skipped by index, the rest of the batches would go to workers whose
            # random streams (augmentation drawn in the dataset) are not where the
            # interrupted epoch left them: they are loaded and dropped, as the core
            # does (hooktrain.batches.skips_by_index).
            return skip_first_batches(dataloader, skip_batches)
        skipping = self.accelerator.skip_first_batches(dataloader, skip_batches)
        # The new loader must draw the same epoch's permutation as the original.
        skipping.set_epoch(epoch)
        return started(skipping)

    # ------------------------------------------------------------------ compute

    @hookimpl(wrapper=True)
    def forward_step(self, trainer: Trainer, stage: str) -> Generator[None, Any, Any]:
        accelerator = self.accelerator
        if stage != "train":
            # A model's own evaluation step is called directly, not through DDP
            # (its dataloaders may give the processes different batch counts, and
            # DDP's forward can run collectives); the accelerator's autocast is
            # then applied here. A plain model goes through the prepared model,
            # already under autocast.
            context: Any = accelerator.autocast() if self._own_eval_step else _NULL
            with context:
                return (yield)
        set_sync = getattr(accelerator.gradient_state, "_set_sync_gradients", None)
        if set_sync is not None:
            set_sync(trainer.sync_gradients)  # so that accelerator.sync_gradients agrees
        # DDP decides in its forward whether the coming backward all-reduces.
        context = _NULL if trainer.sync_gradients else accelerator.no_sync(trainer.model)
        module = trainer.module
        own_step = getattr(module, "training_step", None)
        if own_step is None or self._router is None:
            with context:
                return (yield)
        # Route the core's call of module.training_step through the prepared
        # (DDP) model: module.training_step (shadowed for this call) -> DDP ->
        # router.forward -> the real training_step.
        router = self._router
        object.__setattr__(router, "route", own_step)
        shadowed = module.__dict__.get("training_step", _MISSING)
        module.__dict__["training_step"] = trainer.model
        try:
            with context:
                return (yield)
        finally:
            object.__setattr__(router, "route", None)
            if shadowed is _MISSING:
                del module.__dict__["training_step"]
            else:
                module.__dict__["training_step"] = shadowed

    @hookimpl
    def backward(self, loss: torch.Tensor) -> bool:
        self.accelerator.backward(loss)
        return True

    @hookimpl
    def unscale_gradients(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if trainer.sync_gradients and not self.accelerator.sync_gradients:
            self._synchronise_late_window(trainer)
        # A no-op unless accelerate scales the loss (fp16 on a GPU).
        self.accelerator.unscale_gradients(optimizer=optimizer)

    def _synchronise_late_window(self, trainer: Trainer) -> None:
        """Average the gradients of a window that ended when the data ran out.

        With training data of unknown length, the core learns that a window is the
        epoch's last only when the iterator ends, after its backward passes ran
        under ``no_sync``; accelerate, told the window was still open, would skip
        the optimizer step and the ``zero_grad``, and the gradients would leak into
        the next epoch. So the gradients are all-reduced here, as DDP would have
        done in the last backward, and accelerate is told the window is closed.

        :raises PluginError: with several processes and a wrapper other than DDP
            (FSDP on GPUs), whose gradients cannot be averaged this way.
        """
        import torch

        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            if not isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
                raise PluginError(
                    f"accelerate: a gradient-accumulation window ended with the training "
                    f"data, whose length is unknown, and {type(trainer.model).__name__} "
                    f"did not synchronise its gradients; give the training dataloader a "
                    f"length, or use accumulate_grad_batches=1"
                )
            for parameter in trainer.model.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad.div_(accelerator.num_processes)
        set_sync = getattr(accelerator.gradient_state, "_set_sync_gradients", None)
        if set_sync is not None:
            set_sync(True)

    @hookimpl
    def clip_gradients(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        accelerator = self.accelerator
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        # clip_grad_norm_ unscales every optimizer itself; unscale_gradients
        # already did it for this one, and a second unscale_ is an error.
        accelerator.unscale_gradients = _no_unscale  # type: ignore[method-assign]
        try:
            return accelerator.clip_grad_norm_(parameters, max_norm)
        finally:
            del accelerator.unscale_gradients

    @hookimpl
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        # An AcceleratedOptimizer knows whether its scaler skipped the step.
        return not getattr(optimizer, "step_was_skipped", False)

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    @hookimpl
    def all_gather_object(self, obj: Any) -> list[Any] | None:
        if self.accelerator.num_processes == 1:
            return None
        from accelerate.utils import gather_object

        # gather_object concatenates the processes' lists: one element each.
        return gather_object([obj])

    @hookimpl
    def gather_for_metrics(
        self, trainer: Trainer, outputs: Any, targets: Any
    ) -> tuple[Any, Any] | None:
        if self.accelerator.num_processes == 1:
            return None
        if trainer.dataloader_idx in self._whole_sets:
            # Every process evaluates the whole set: its own outputs are all of them,
            # and reducing them over the processes would count each sample N times.
            return outputs, targets
        if self._own_eval_step:
            # An own evaluation step's loaders are uneven: a gather per batch would wait
            # for a process with no batch left. The end-of-run reduction sums instead.
            return None
        gathered = self.accelerator.gather_for_metrics((outputs, targets))
        return gathered[0], gathered[1]

    @hookimpl
    def teardown(self) -> None:
        self._router = None


_MISSING = object()


_NULL = contextlib.nullcontext()


def _no_unscale(optimizer: Any = None) -> None:
    return None
