"""The `Trainer`: its options, the state hooks read, and the four entry points.

The loops live in their own modules (`hooktrain.fit_loop`,
`hooktrain.evaluation`); this one holds what plugins see of a run and knows no
plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hooktrain import state
from hooktrain.defaults import CoreDefaults
from hooktrain.epoch_metrics import EpochMetrics
from hooktrain.errors import ConfigurationError
from hooktrain.evaluation import concatenable, run_evaluation
from hooktrain.fit_loop import run_fit
from hooktrain.hookcalls import ResolvedHooks
from hooktrain.instrument import TRACE_ENV, instrument, stderr_tracer
from hooktrain.metrics import MetricFn, Metrics
from hooktrain.optimization import Scheduler
from hooktrain.options import (
    check_loader,
    check_model,
    check_options,
    loader_list,
    resolve_device,
    trainer_hparams,
)
from hooktrain.plugins import PluginManager, PluginSelection, register_selection
from hooktrain.publishing import log_value
from hooktrain.results import unexpected_result
from hooktrain.rng import seed_everything
from hooktrain.running_means import RunningMeans
from hooktrain.stages import begin_stage, run_stage

__all__ = ["Trainer", "seed_everything"]


class Trainer:
    """Runs ``fit``, ``validate``, ``test`` and ``predict``; plugins do the rest.

    :param plugins: what to load, in the order their implementations run:
        entry-point names (``"tqdm"``), import paths (``"pkg.mod:Plugin"``), plugin
        objects, or pairs ``(name, {options})``. ``None`` selects the default set
        (``hooktrain.plugins.DEFAULT_PLUGINS``, those installed); ``[]`` selects none.
        Two plugins that take the same exclusive role (their ``exclusive_roles``) raise
        ``ConfigurationError`` here, before anything runs.
    :param max_epochs: epochs to train (at least 1).
    :param max_steps: stop after this many optimizer steps, even mid-epoch.
    :param seed: an integer >= 0 that seeds Python, NumPy and torch when each stage
        starts, and the per-epoch shuffling order of the training data; ``validate``,
        ``test`` and ``predict`` put every global generator back as they found it
        when they end. A model built before that was initialised unseeded: call
        ``hooktrain.seed_everything(seed)`` before building it when its initial
        weights must repeat too.
    :param device: where the core puts the model and batches; default CUDA when
        available, else the CPU; one this torch cannot use raises
        ``ConfigurationError`` here. A plugin may change it in ``setup``.
    :param accumulate_grad_batches: micro-batches per optimizer step.
    :param gradient_clip_val: clip the gradient norm of each optimizer's parameters
        to this value before its step.
    :param check_val_every_n_epoch: validate after every N-th epoch.
    :param val_every_n_steps: also validate every N optimizer steps.
    :param limit_train_batches: at most this many batches per training epoch (and
        likewise ``limit_val_batches``, ``limit_test_batches``, ``limit_predict_batches``).
        ``limit_val_batches=0`` turns validation in ``fit`` off: no validation hook
        runs, as when no ``val_dataloaders`` were given.
    :param log_every_n_steps: publish step metrics (and check the loss is finite)
        every N optimizer steps.
    :param check_finite_every_step: check the loss every step (one device sync per
        step) instead of every ``log_every_n_steps``.
    :raises ConfigurationError: for an option of the wrong type or out of its range
        (`hooktrain.options.check_options`), before anything runs.
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
        limits = {
            "train": limit_train_batches,
            "validate": limit_val_batches,
            "test": limit_test_batches,
            "predict": limit_predict_batches,
        }
        check_options(
            plugins=plugins,
            max_epochs=max_epochs,
            max_steps=max_steps,
            seed=seed,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            check_val_every_n_epoch=check_val_every_n_epoch,
            val_every_n_steps=val_every_n_steps,
            limits=limits,
            log_every_n_steps=log_every_n_steps,
            check_finite_every_step=check_finite_every_step,
        )
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.seed = seed
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_every_n_steps = val_every_n_steps
        self.limits = limits
        self.log_every_n_steps = log_every_n_steps
        self.check_finite_every_step = check_finite_every_step
        self.device = resolve_device(device)

        #: pluggy's manager; ``plugin_manager.hook.<name>(trainer=..., ...)`` calls a hook.
        self.plugin_manager = PluginManager()
        self._defaults = CoreDefaults()
        registered = register_selection(self.plugin_manager, plugins)
        # The defaults are trylast, and pluggy puts each trylast implementation in
        # front of those registered before it, so they come last when registered last:
        # a plugin's trylast optimizer_step then runs before the core's answers.
        self.plugin_manager.register(self._defaults, name="core")
        #: Registered names of the selected plugins, in list order.
        self.plugin_names: list[str] = [name for name, _ in registered]
        #: Registered name to where it was selected: ``"script"``, the default set,
        #: ``HOOKTRAIN_PLUGINS``, or a ``pyproject.toml`` (`hooktrain.selection`).
        self.plugin_origins: dict[str, str] = dict(registered)
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
        #: Which of the running evaluation stage's dataloaders the current batch came
        #: from (0 in training, and once the stage has ended). A model step that
        #: takes a ``dataloader_idx`` argument is given it.
        self.dataloader_idx = 0
        #: True once every batch of the current epoch was trained.
        self.epoch_complete = False
        #: Set it to stop training cleanly after the next optimizer step (all processes
        #: agree on it); a stop in the middle of an epoch skips that epoch's end.
        self.should_stop = False
        #: Set with ``should_stop`` by a plugin stopping the fit from outside the run
        #: (the checkpoint plugin, on SIGTERM): the run did not finish, and a rerun
        #: with ``ckpt_path="last"`` continues it (as Lightning's). Reset by ``fit``.
        self.interrupted = False
        #: Whether the current micro-batch completes a gradient-accumulation window.
        self.sync_gradients = True
        self.last_step_skipped = False
        self.global_rank = 0
        self.world_size = 1
        self.stage: str | None = None
        self._running_stage: str | None = None
        #: Seed of the training data's per-epoch shuffling (saved in checkpoints).
        self.data_seed = 0
        self._schedulers: list[Scheduler] = []
        # The learning rates the fit's optimizers were configured with (checkpointed).
        self._configured_lrs: list[list[float | None]] = []
        self._hooks: ResolvedHooks | None = None
        self._pending_rng: Mapping[str, Any] | None = None
        self._rng_outside_validation: Mapping[str, Any] | None = None
        # The state the current epoch's data came from, and the one a resume puts
        # back before recreating the interrupted epoch's iterator.
        self._epoch_start_state: dict[str, Any] | None = None
        self._pending_generators: list[Any] | None = None
        self._pending_epoch_data: Mapping[str, Any] | None = None
        self._resume_skip = 0
        self._resume_split: dict[str, Any] | None = None  # how the interrupted epoch split
        # The global step of the last validation inside fit: an epoch's end does not
        # validate the same weights again.
        self._validated_at_step = -1
        # Names computed by the open epoch's validations; None when none ran.
        self._epoch_validation: set[str] | None = None
        self._warned_length = False
        self._warned_empty_validation = False
        self._fit_start_step = 0  # global_step when the fit started or resumed
        self._log_prefix = ""
        # An evaluation's per-dataloader suffix ("/dataloader_idx_1") while its
        # batches run, so that values logged there stay apart like returned ones.
        self._log_suffix = ""
        self._active_means: RunningMeans | None = None
        self._train_means = RunningMeans()
        # Stateful metrics (torchmetrics) of the training epoch, and of the stage or
        # dataloader whose batches are running now (what compute_metrics updates).
        self._train_metrics: EpochMetrics | None = None
        self._epoch_metrics: EpochMetrics | None = None
        self._logged_since_publish: set[str] = set()
        # Names logged in a stage's epoch-end hooks: they belong to that epoch's
        # publication, not to the next step's.
        self._epoch_end_logs: set[str] | None = None
        # Names logged outside any batch (setup, on_fit_start, on_train_epoch_start):
        # they go out with the next log point and with the epoch's end, as the
        # values logged inside batches do.
        self._logged_outside_batches: set[str] = set()
        self._checked_steps_from = 1
        self._batch_size = 1

    # ------------------------------------------------------------------ properties

    @property
    def is_global_zero(self) -> bool:
        """True on the process that writes files and draws progress (rank 0)."""
        return self.global_rank == 0

    @property
    def batch_size(self) -> int:
        """How many samples the batch being trained or evaluated counts for: its
        weight in the epoch's means, and the default ``batch_size`` of
        :meth:`log`. Set before each step from the batch as it arrives (the first
        dimension of its first tensor, else 1), then from what the step returned:
        its ``"batch_size"``, or a plain model's outputs' first dimension
        (`hooktrain.batches.step_batch_size`). A throughput counter reads it in
        ``on_train_batch_end``. Outside a batch it holds the last batch's (1 before
        the first), which means nothing there."""
        return self._batch_size

    @property
    def finished(self) -> bool:
        """True once the fit has nothing left to train: its last epoch (by
        ``max_epochs``) has ended, or ``global_step`` has reached ``max_steps``. A
        stop by ``should_stop`` leaves it False, as the trainer cannot tell a final
        stop from a pause: after early stopping, a rerun with ``ckpt_path="last"``
        trains nothing (the plugin restores its decision), yet this says False."""
        if self.max_steps is not None and self.global_step >= self.max_steps:
            return True
        return self.epoch_complete and self.current_epoch + 1 >= self.max_epochs

    @property
    def hparams(self) -> dict[str, Any]:
        """The trainer's settings and plugin list, for loggers to record."""
        return trainer_hparams(self)

    # ------------------------------------------------------------------ logging

    def log(self, name: str, value: Any, *, batch_size: float | torch.Tensor | None = None) -> None:
        """Record a metric value (a number or a 0-dim tensor; tensors are not read).

        Inside a batch the value also joins the epoch's batch-size-weighted mean;
        inside validation or test the name gets the ``val_`` / ``test_`` prefix
        unless it already has it, and, with several dataloaders, a value logged
        during dataloader ``i``'s batches gets the suffix ``/dataloader_idx_i``, as
        the step's returned values do. ``trainer.metrics[name]`` returns the latest
        value, and from the epoch's end its mean (as for ``loss``). A value logged
        in validation or test is published with that stage's results, not with the
        next training step's. A value logged in training reaches the loggers at the
        next log point (``log_every_n_steps``) of its epoch, and in the epoch's mean.
        A value logged in a stage's epoch-end hooks (``on_train_epoch_end``,
        ``on_validation_epoch_end``, ``on_validation_end``...) belongs to that epoch:
        it is published with it and returned by ``validate``/``test``. One logged
        outside a batch in training (a fit's ``setup``, ``on_fit_start``,
        ``on_train_epoch_start``) goes out, as it is, with the next log point and
        with the epoch's end. A value logged after a stage's last publication
        (``on_fit_end``, ``teardown``), or that no publication took, stays in
        ``trainer.metrics`` and reaches no logger; hooktrain warns when one listens.

        :param batch_size: the value's weight in the epoch's mean; by default the
            size of the batch being trained on (its first dimension). A quantity of
            the optimizer step rather than of a batch (a gradient norm, a learning
            rate, a throughput) is logged with ``batch_size=1``, so that every step
            weighs the same, whatever the size of its last micro-batch. A positive
            number, or a one-element tensor (a token count, left on the device and
            not checked).
        :raises ConfigurationError: for a tensor of more than one element, a value
            that is neither a number nor a tensor, a ``batch_size`` that is neither
            a positive number nor a one-element tensor, and for the name ``"loss"``
            in a training batch: the loop logs the loss the step returned under it.
        """
        log_value(self, name, value, batch_size)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (the tensor itself with one)."""
        if self.world_size == 1:
            return tensor
        reduced = self.plugin_manager.hook.all_reduce(trainer=self, tensor=tensor)
        if reduced is None:
            return tensor
        if not isinstance(reduced, torch.Tensor):
            raise unexpected_result(self.plugin_manager, "all_reduce", reduced, "a tensor")
        return reduced

    # ------------------------------------------------------------------ checkpoints

    def dump_checkpoint(self) -> dict[str, Any]:
        """Everything needed to resume this run exactly, as a mapping of tensors,
        numbers, strings, lists and dicts (loadable with ``weights_only=True``).

        Holds the model, optimizers, LR schedulers, progress, RNG states, metrics,
        versions and the plugin list, and in the middle of an epoch (``epoch_complete``
        false) what resuming there needs: the RNG states the epoch's data came from
        and the epoch's running sums and metric states. Then ``on_save_checkpoint``
        lets each plugin add its own state under ``checkpoint["plugins"][name]``.
        Tensors are the live ones: copy them before writing from another thread.
        With several processes this is a collective call (the running epoch sums and
        stateful metrics of every process are combined, and every process's random
        states gathered, each resumed by its own process): every process must call
        it at the same point.

        :raises ConfigurationError: outside a stage (no model yet).
        :raises NonFiniteLossError: in the middle of an epoch, when a training loss
            since the last check (a log point) was NaN or infinite: the checkpoint
            would hold the weights it trained.
        :raises PluginError: when ``get_state_dict`` returned no pair (model state
            dict, one state dict per optimizer), or a plugin's state holds a value
            ``torch.load(weights_only=True)`` refuses (a NumPy number, a ``Path``),
            naming the plugin; such a value elsewhere (a scheduler's state) raises
            ``ConfigurationError``.
        """
        return state.dump_checkpoint(self)

    def restore_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Put the run back where ``checkpoint`` (from :meth:`dump_checkpoint`) was
        taken, then call ``on_load_checkpoint``. RNG states are applied when the loop
        reaches the saved position, so the data order and dropout match exactly.

        :raises ConfigurationError: when the model, optimizers or schedulers do not
            fit the checkpoint (every mismatch is named).
        """
        state.restore_checkpoint(self, checkpoint)

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
            and ``configure_optimizers``. It trains in the train/eval modes its
            modules are in (a fresh module is in train mode). A
            ``torch.compile(module)`` runs compiled, its own steps included, and
            ``trainer.module`` (and checkpoints) is the module inside it.
        :param train_dataloaders: an iterable of batches, usually a ``DataLoader``.
        :param val_dataloaders: one iterable or a list of them. A list whose first
            item is a batch (a tensor, tuple, dict, or ``[inputs, targets]`` list) is
            one iterable, a list of batches; see `hooktrain.options.loader_list`.
        :param loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        :param optimizer: an optimizer, or a callable taking the parameters.
        :param metrics: name to ``fn(outputs, targets)``, computed on training and
            validation batches (``hooktrain.accuracy`` for example) and averaged over
            the epoch, or to a ``torchmetrics.Metric`` (any object with ``update``,
            ``compute`` and ``reset``), updated every batch and computed over the
            whole epoch (see docs/metrics.md).
        :param ckpt_path: a checkpoint to resume from (``"last"`` with a plugin that
            keeps checkpoints).
        :raises ConfigurationError: before any training, for a model, loader, loss,
            optimizer or metrics that cannot be used.
        """
        check_model(model, training=True, plugin=self.plugin_manager.is_registered(model))
        check_loader("train_dataloaders", train_dataloaders)
        eval_loaders = loader_list("val_dataloaders", val_dataloaders)
        if loss_fn is None and not callable(getattr(model, "training_step", None)):
            raise ConfigurationError(
                "fit() needs loss_fn=... for a model without its own "
                "training_step(batch, batch_idx)"
            )
        begin_stage(self, "fit", model, loss_fn, metrics)
        self.interrupted = False  # kept through a validate() or test() that follows
        self.train_dataloader = train_dataloaders
        self.eval_dataloaders = eval_loaders
        # A previous fit's values would be read as this one's (early stopping on a
        # val_loss this run has not computed yet); cleared before setup, so that
        # what setup logs is kept.
        self.metrics.clear()
        run_stage(self, "fit", lambda: run_fit(self, optimizer, ckpt_path))

    def validate(
        self,
        model: nn.Module,
        dataloaders: Iterable[Any] | Sequence[Iterable[Any]],
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> dict[str, float]:
        """Run one validation pass; return the ``val_*`` metrics.

        ``loss_fn`` and ``metrics`` default to those of the last ``fit`` on this
        trainer.

        :raises ConfigurationError: when the pass computed no metric at all.
        """
        return run_evaluation(self, "validate", model, dataloaders, loss_fn, metrics)

    def test(
        self,
        model: nn.Module,
        dataloaders: Iterable[Any] | Sequence[Iterable[Any]],
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> dict[str, float]:
        """Run one test pass; return the ``test_*`` metrics (``loss_fn`` and
        ``metrics`` as for :meth:`validate`)."""
        return run_evaluation(self, "test", model, dataloaders, loss_fn, metrics)

    def predict(
        self, model: nn.Module, dataloaders: Iterable[Any] | Sequence[Iterable[Any]]
    ) -> Any:
        """Run the model over ``dataloaders`` without gradients.

        :return: the predictions concatenated along the first dimension when every
            batch produced a tensor of at least one dimension, all of one dtype, on
            one device, and of one shape past the first dimension; else the list of
            each batch's predictions, in order.
        """
        predictions = run_evaluation(self, "predict", model, dataloaders, None, None)["predictions"]
        if concatenable(predictions):
            return torch.cat(predictions)
        return predictions
