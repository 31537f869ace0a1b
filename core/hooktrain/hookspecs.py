"""Every hook the training loop calls, in the order the loop calls them.

Two kinds of hook live here:

* **Event hooks** (``setup``, ``on_*``, ``teardown``, ``log_metrics``) tell plugins
  that a phase has been reached. Every implementation is called; return values
  are ignored.
* **Compute hooks** (``prepare``, ``batch_iterator``, ``transfer_batch_to_device``,
  ``forward_step``, ``backward``, ``unscale_gradients``, ``clip_gradients``,
  ``optimizer_step``, ``all_reduce``, ``all_gather_object``, ``gather_for_metrics``,
  ``compute_metrics``,
  ``load_checkpoint``, ``get_state_dict``, ``set_state_dict``)
  are how the loop computes. The core ships a plain default implementation of each
  (registered ``trylast``); a plugin replaces it by returning a value that is not
  ``None`` (``firstresult``), or surrounds it with a ``wrapper=True`` implementation
  (to run it under ``torch.autocast``, for instance).

Every hook receives the `hooktrain.Trainer` as the keyword argument
``trainer``; an implementation names only the arguments it needs.

A hook that no plugin implements is never called: the loop checks once, before it
starts, which hooks have implementations.

The order of a ``fit`` with validation (the test ``tests/test_hook_order.py``
asserts exactly this sequence, and ``docs/hook-order.md`` shows it):

* ``setup(stage="fit")``
* ``prepare(stage="fit")``
* ``load_checkpoint``, ``set_state_dict`` and ``on_load_checkpoint`` (only with
  ``ckpt_path``)
* ``on_fit_start``
* for each epoch:

  * ``on_train_epoch_start``
  * ``batch_iterator(stage="train")``
  * for each batch:

    * ``transfer_batch_to_device``
    * ``on_train_batch_start``
    * ``forward_step(stage="train")``
    * ``on_before_backward``
    * ``backward``
    * ``on_after_backward``
    * when the batch completes a gradient-accumulation window, for each optimizer:
      ``unscale_gradients``, ``on_before_optimizer_step``, ``clip_gradients``
      (only with ``gradient_clip_val``), ``optimizer_step``; then LR schedulers
      stepped per step, then for each optimizer ``on_before_zero_grad``
    * ``compute_metrics(stage="train")`` (only when ``fit`` was given ``metrics=``)
    * validation, when ``val_every_n_steps`` makes it due (the sequence below)
    * ``on_train_batch_end``
    * ``log_metrics`` every ``log_every_n_steps`` optimizer steps

  * validation, when ``check_val_every_n_epoch`` makes it due (never without
    validation dataloaders or with ``limit_val_batches=0``):

    * ``on_validation_start``
    * ``on_validation_epoch_start``
    * ``batch_iterator(stage="validate")``
    * for each batch: ``transfer_batch_to_device``, ``on_validation_batch_start``,
      ``forward_step(stage="validate")``, ``gather_for_metrics``,
      ``compute_metrics(stage="validate")``, ``on_validation_batch_end``
    * ``on_validation_epoch_end``
    * ``on_validation_end``
    * ``log_metrics``

  * ``on_train_epoch_end``
  * ``log_metrics``

* ``on_fit_end``
* ``teardown(stage="fit")``

If anything raises, ``on_exception`` runs, then ``teardown``, then the error
propagates. ``validate``, ``test`` and ``predict`` follow the validation sequence
above between their own ``setup`` and ``teardown``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hooktrain.markers import hookspec

if TYPE_CHECKING:
    import torch

    from hooktrain.trainer import Trainer

# --------------------------------------------------------------------------------
# Setup and teardown
# --------------------------------------------------------------------------------


@hookspec
def setup(trainer: Trainer, stage: str) -> None:
    """Called first, when ``fit``, ``validate``, ``test`` or ``predict`` begins.

    Nothing has been built yet: the model is the user's and is still on its
    original device, optimizers do not exist. A plugin that decides where training
    runs sets ``trainer.device``, ``trainer.global_rank`` and
    ``trainer.world_size`` here, so that everything after it (every other plugin
    included) sees the final values.

    :param trainer: the trainer.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@hookspec
def teardown(trainer: Trainer, stage: str) -> None:
    """Called last, when the stage ends, whether it succeeded or raised.

    Flush files, close writers and join threads here. Never skipped: it runs after
    ``on_exception`` too, and every plugin's implementation runs even when another
    one raised (the first such error is raised once all have run, or printed to
    stderr when the stage had failed already).

    :param trainer: the trainer.
    :param stage: the same value ``setup`` received.
    """


# --------------------------------------------------------------------------------
# Preparation: plugins replace or wrap what the loop computes with
# --------------------------------------------------------------------------------


@hookspec
def prepare(trainer: Trainer, stage: str) -> None:
    """Called after the core has built the run's objects, before any batch.

    By now ``trainer.model`` is on ``trainer.device``, and for ``fit``
    ``trainer.optimizers`` and ``trainer.lr_schedulers`` exist. An implementation
    may replace any of ``trainer.model``, ``trainer.optimizers``,
    ``trainer.lr_schedulers``, ``trainer.train_dataloader`` and
    ``trainer.eval_dataloaders`` with wrapped versions (distributed data parallel,
    a sharded dataloader). ``trainer.module`` keeps the user's unwrapped model
    (given ``torch.compile(module)``, the module inside it). This is the last place
    to replace the model or the optimizers: the fit's step is built from what
    ``prepare`` leaves, and a later replacement raises ``ConfigurationError``.

    :param trainer: the trainer.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@hookspec(firstresult=True)
def load_checkpoint(trainer: Trainer, ckpt_path: str) -> Mapping[str, Any] | None:
    """Called during ``fit(..., ckpt_path=...)`` to read the checkpoint to resume from.

    The first implementation that returns a mapping wins; that mapping is what
    `hooktrain.Trainer.dump_checkpoint` once produced, and the trainer restores
    it. A plugin returns ``None`` to let the next implementation try. The core's
    default reads a plain file with ``torch.load(..., weights_only=True)``; a
    checkpoint plugin resolves names such as ``"last"`` and checks integrity.

    :param trainer: the trainer.
    :param ckpt_path: the value passed to ``fit``.
    :return: the checkpoint mapping, or ``None``. An implementation that decides the
        run must start fresh raises nothing and returns an empty mapping. Anything
        else (a bare ``state_dict``, a mapping without ``"model"`` and
        ``"progress"``) raises ``PluginError`` naming the implementers.
    """


# --------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------


@hookspec
def on_fit_start(trainer: Trainer) -> None:
    """Called once per ``fit``, after preparation and after any checkpoint was
    restored, right before the first epoch.

    ``trainer.current_epoch`` and ``trainer.global_step`` already hold the values the
    run resumes from: after a checkpoint taken at an epoch's end, that epoch, with
    ``trainer.epoch_complete`` true (the next one starts with the loop).
    """


@hookspec
def on_fit_end(trainer: Trainer) -> None:
    """Called once per ``fit`` after the last epoch, when training finished without
    an exception (also when it stopped early through ``trainer.should_stop``)."""


@hookspec
def on_train_epoch_start(trainer: Trainer) -> None:
    """Called at the start of every training epoch, with the model in train mode.

    ``trainer.current_epoch`` is the epoch about to run (counted from 0). A run
    resumed from a checkpoint taken in the middle of an epoch calls it again for
    that epoch, with ``trainer.epoch_batches_done`` the batches already trained
    (0 for an epoch starting afresh): state of the open epoch that
    ``on_load_checkpoint`` brought back is not to be reset then.
    """


@hookspec
def on_train_epoch_end(trainer: Trainer) -> None:
    """Called at the end of every training epoch, after that epoch's validation.

    ``trainer.metrics`` holds the epoch's means (``loss``, every metric and every
    value logged during the epoch) and the validation metrics (``val_*``), so a
    plugin that watches a validation metric finds it here. Progress already counts
    the epoch as complete: a checkpoint taken here resumes at the next epoch.
    """


@hookspec
def on_train_batch_start(trainer: Trainer, batch: Any, batch_idx: int) -> None:
    """Called for every training batch, after it was moved to the device and
    before the forward step.

    :param batch: the batch, on ``trainer.device``.
    :param batch_idx: the index of the batch within the epoch.
    """


@hookspec
def on_train_batch_end(trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Called after every training batch, after the optimizer step it completed (if
    any) and after validation that the step made due.

    Progress already counts this batch as done, so a checkpoint written here resumes
    with the next batch. ``outputs`` is what ``forward_step`` returned; its loss is
    still a tensor: reading it as a Python number forces a device sync, so read it
    only when you need it (``trainer.metrics`` converts lazily).

    :param outputs: the result of ``forward_step`` (a loss tensor or a mapping
        holding ``"loss"``), as it returned it: its tensors are still attached to
        the autograd graph (whose buffers backward has freed), so ``.detach()`` one
        before keeping it or converting it (``.numpy()`` refuses it otherwise).
    :param batch: the batch.
    :param batch_idx: the index of the batch within the epoch.
    """


@hookspec
def on_before_backward(trainer: Trainer, loss: torch.Tensor) -> None:
    """Called before ``backward`` with the loss that will be back-propagated
    (already divided by ``accumulate_grad_batches``)."""


@hookspec
def on_after_backward(trainer: Trainer) -> None:
    """Called after ``backward``: gradients of this micro-batch are accumulated in
    ``.grad``. ``trainer.sync_gradients`` says whether an optimizer step follows."""


@hookspec
def on_before_optimizer_step(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Called before each optimizer step, after the gradients were unscaled and
    before they are clipped: the place to inspect or log true gradient values."""


@hookspec
def on_before_zero_grad(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Called after the optimizer step, right before the optimizer's gradients are
    reset (set to ``None``)."""


# --------------------------------------------------------------------------------
# Validation, test and predict
# --------------------------------------------------------------------------------


@hookspec
def on_validation_start(trainer: Trainer) -> None:
    """Called when a validation run begins (inside ``fit`` or from ``validate``),
    with the model in eval mode and gradients disabled."""


@hookspec
def on_validation_epoch_start(trainer: Trainer) -> None:
    """Called after ``on_validation_start``, before the first validation batch."""


@hookspec
def on_validation_batch_start(
    trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int
) -> None:
    """Called for every validation batch, after it was moved to the device.

    :param dataloader_idx: which validation dataloader the batch comes from.
    """


@hookspec
def on_validation_batch_end(
    trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
) -> None:
    """Called after every validation batch with what ``forward_step`` returned."""


@hookspec
def on_validation_epoch_end(trainer: Trainer) -> None:
    """Called after the last validation batch; ``trainer.metrics`` already holds the
    ``val_*`` means of this validation run, reduced across processes."""


@hookspec
def on_validation_end(trainer: Trainer) -> None:
    """Called when a validation run ends, before the model returns to train mode."""


@hookspec
def on_test_start(trainer: Trainer) -> None:
    """Called when ``test`` begins, with the model in eval mode."""


@hookspec
def on_test_epoch_start(trainer: Trainer) -> None:
    """Called after ``on_test_start``, before the first test batch."""


@hookspec
def on_test_batch_start(trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
    """Called for every test batch, after it was moved to the device."""


@hookspec
def on_test_batch_end(
    trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
) -> None:
    """Called after every test batch with what ``forward_step`` returned."""


@hookspec
def on_test_epoch_end(trainer: Trainer) -> None:
    """Called after the last test batch; ``trainer.metrics`` holds the ``test_*``
    means."""


@hookspec
def on_test_end(trainer: Trainer) -> None:
    """Called when ``test`` ends."""


@hookspec
def on_predict_start(trainer: Trainer) -> None:
    """Called when ``predict`` begins, with the model in eval mode."""


@hookspec
def on_predict_epoch_start(trainer: Trainer) -> None:
    """Called after ``on_predict_start``, before the first batch."""


@hookspec
def on_predict_batch_start(
    trainer: Trainer, batch: Any, batch_idx: int, dataloader_idx: int
) -> None:
    """Called for every prediction batch, after it was moved to the device."""


@hookspec
def on_predict_batch_end(
    trainer: Trainer, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
) -> None:
    """Called after every prediction batch with the batch's predictions."""


@hookspec
def on_predict_epoch_end(trainer: Trainer, predictions: list[Any]) -> None:
    """Called after the last prediction batch with every batch's predictions, in
    order (the list is the one ``predict`` returns from; plugins may read it)."""


@hookspec
def on_predict_end(trainer: Trainer) -> None:
    """Called when ``predict`` ends."""


# --------------------------------------------------------------------------------
# How the loop computes (compute hooks; the core's defaults run last)
# --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def batch_iterator(
    trainer: Trainer, dataloader: Iterable[Any], stage: str, skip_batches: int
) -> Iterable[Any] | None:
    """Called once per epoch and dataloader to make the iterable of batches.

    The default seeds the shuffling of a ``RandomSampler`` from the run's seed and
    the epoch (so an epoch's order does not depend on anything else), and, when
    resuming mid-epoch, skips the first ``skip_batches`` batches by skipping their
    indices, without loading their data.

    :param dataloader: the dataloader of this stage (possibly prepared by a plugin).
    :param stage: ``"train"``, ``"validate"``, ``"test"`` or ``"predict"``.
    :param skip_batches: batches of this epoch already trained before a resume.
    :return: an iterable yielding the remaining batches, or ``None`` to defer.
    """


@hookspec(firstresult=True)
def transfer_batch_to_device(trainer: Trainer, batch: Any, device: torch.device) -> Any:
    """Called for every batch of every stage to move it to ``device``.

    The default moves every tensor found in tuples, lists and dicts, and leaves
    everything else as it is.

    :return: the batch on the device, or ``None`` to defer to the next
        implementation.
    """


@hookspec(firstresult=True)
def forward_step(trainer: Trainer, batch: Any, batch_idx: int, stage: str) -> Any:
    """Called for every batch to run the model: the forward pass, and for training
    the loss.

    The default calls the model's own ``training_step`` / ``validation_step`` /
    ``test_step`` / ``predict_step`` when it defines one, and otherwise unpacks
    ``(inputs, targets)``, calls the model and applies ``loss_fn``. When
    ``trainer.model`` is ``torch.compile``'s wrapper of ``trainer.module``, the
    model's own step runs through that wrapper's compiler
    (`hooktrain.batches.compiled_step`). The default looks the model's own step up
    at a stage's first batch (again whenever ``trainer.model`` changes), not at
    every batch, as Keras builds its ``train_function`` once a fit: a step method
    assigned to the model in the middle of a stage runs from the next stage on (a
    plugin that switches steps mid-stage implements this hook instead). A
    ``wrapper=True`` implementation surrounds it, to run it under ``torch.autocast``
    for instance.

    :param stage: ``"train"``, ``"validate"``, ``"test"`` or ``"predict"``.
    :return: for ``"train"``, the loss tensor or a mapping holding ``"loss"``; for
        evaluation, a loss (a one-value tensor or a number), ``None``, or a
        mapping: ``"outputs"`` and ``"targets"`` (the loop then computes ``loss_fn``
        and the metrics on them) and any other scalar entries (each becomes a
        metric, ``"acc"`` giving ``val_acc``); for ``"predict"``, the predictions.
        An evaluation result of another kind is passed to the batch-end hooks and
        is no metric.
    :raises ConfigurationError: (from the loop) for an evaluation loss that is a
        string, naming the plugins that implement this hook.
    """


@hookspec(firstresult=True)
def backward(trainer: Trainer, loss: torch.Tensor) -> bool | None:
    """Called to back-propagate the loss of a training micro-batch.

    The default calls ``loss.backward()``. A plugin that scales the loss or owns
    backward (a gradient scaler, an accelerator) does the work itself.

    :return: ``True`` once the backward pass is done; ``None`` to defer. Any other
        value raises ``PluginError`` (``return loss`` would skip the pass silently).
    """


@hookspec
def unscale_gradients(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Called before each optimizer step, before ``on_before_optimizer_step`` and
    before clipping, so that a plugin that scaled the loss brings the gradients back
    to their true values. No default: with no implementation, nothing is called."""


@hookspec(firstresult=True)
def clip_gradients(
    trainer: Trainer, optimizer: torch.optim.Optimizer, max_norm: float
) -> torch.Tensor | None:
    """Called before each optimizer step when ``gradient_clip_val`` is set.

    The default clips the optimizer's parameters' gradients to ``max_norm`` with
    ``torch.nn.utils.clip_grad_norm_`` and returns the total norm, which the core
    logs as ``grad_norm`` once a step (with several optimizers, the 2-norm of their
    norms: the norm over every parameter, each group clipped on its own). A step
    that ``optimizer_step`` skipped (a gradient scaler found inf/NaN gradients) logs
    none, so that the epoch's mean is that of the steps taken.

    :return: the gradient norm before clipping (a tensor or a number), or ``None``
        to defer. Any other value (``True`` included) raises ``PluginError``.
    """


@hookspec(firstresult=True)
def optimizer_step(trainer: Trainer, optimizer: torch.optim.Optimizer) -> bool | None:
    """Called to step one optimizer, once per completed gradient-accumulation window.

    :return: ``True`` when the parameters were updated, ``False`` when the step was
        skipped (a gradient scaler found inf/NaN gradients): the core then does not
        step LR schedulers, and sets ``trainer.last_step_skipped``. ``None`` defers
        to the next implementation. Any other value raises ``PluginError``.
    """


@hookspec(firstresult=True)
def all_reduce(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor | None:
    """Called to sum a tensor over all processes (metric sums at the end of an
    epoch or evaluation, the ``should_stop`` flag, a plugin's ``trainer.all_reduce``).
    Only called when ``trainer.world_size > 1``, and then at the same point on every
    process, whatever each one saw (a process without a single evaluation batch
    still takes part).

    :return: the summed tensor, identical on every process; ``None`` defers.
    """


@hookspec(firstresult=True)
def all_gather_object(trainer: Trainer, obj: Any) -> list[Any] | None:
    """Called to collect a picklable Python object from every process: before the
    metric sums are reduced at the end of an epoch or evaluation, the names each
    process logged, so that the processes agree on which values they sum (a name
    only some processes logged is reduced over those). Only called when
    ``trainer.world_size > 1``, and then at the same point on every process.

    The default returns ``[obj]``, the object of the only process; a plugin that
    makes the run distributed must implement this hook with ``all_reduce``
    (the loop raises a ``PluginError`` when the list does not hold one object per
    process).

    :param obj: a picklable object (for the metric names, a sorted list of strings).
    :return: a list of ``trainer.world_size`` objects, rank ``r``'s at index ``r``,
        identical on every process; ``None`` defers.
    """


@hookspec(firstresult=True)
def gather_for_metrics(trainer: Trainer, outputs: Any, targets: Any) -> tuple[Any, Any] | None:
    """Called for every evaluation batch whose step gave the model's outputs and
    targets (a model without its own evaluation step, or a step returning
    ``"outputs"`` and ``"targets"``), before the metrics are computed, to collect
    the per-sample outputs and targets of every process (without samples duplicated
    to pad the last batch).

    Metrics computed on the result are already global and are not reduced again;
    the batch weighs its own weight times the factor by which gathering grew the
    outputs' first dimension.

    :return: ``(outputs, targets)`` gathered, or ``None`` to defer. With no
        implementation the loop uses the local values.
    """


@hookspec(firstresult=True)
def compute_metrics(
    trainer: Trainer, outputs: Any, targets: Any, stage: str
) -> Mapping[str, Any] | None:
    """Called for every batch whose step gave the model's outputs and targets (a
    model without its own step, or a step returning ``"outputs"`` and
    ``"targets"``): in evaluation after ``gather_for_metrics``, in training after
    the optimizer step and only when ``fit`` was given ``metrics=``. It computes the
    batch's metric values and, in evaluation, its loss.

    The core's default computes ``loss_fn(outputs, targets)`` (evaluation stages,
    when a ``loss_fn`` was given; a loss the step returned itself is kept instead)
    and every function of ``metrics=``, without gradients, and updates the stage's
    copies of its stateful metrics (``torchmetrics.Metric``), whose values the loop
    computes at the epoch's end (they are not in the returned mapping). A precision plugin wraps
    this hook (``wrapper=True``) so that these computations run under the same
    autocast as the forward that produced ``outputs``, as the training loss does.

    :param outputs: the model's outputs, gathered from every process when
        ``gather_for_metrics`` did so; typically ``(batch, classes)`` scores.
    :param targets: the matching targets, likewise.
    :param stage: ``"train"``, ``"validate"`` or ``"test"``.
    :return: metric name (without the ``val_``/``test_`` prefix) to a 0-dim tensor
        or a number, each weighted by the batch's size in the epoch's mean;
        ``None`` defers to the next implementation.
    """


# --------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def get_state_dict(trainer: Trainer) -> tuple[dict[str, Any], list[Any]] | None:
    """Called by `hooktrain.Trainer.dump_checkpoint` for the model's and the
    optimizers' state, before ``on_save_checkpoint``.

    The core's default returns ``trainer.module.state_dict()`` and each optimizer's
    ``state_dict()``. A plugin that shards the model (``fsdp``) returns the form of
    ``torch.distributed.checkpoint.state_dict``: ``DTensor`` values holding this
    process's shards, and optimizer states keyed by parameter name. A checkpoint
    plugin that finds ``DTensor`` values writes the checkpoint from every process
    (through ``torch.distributed.checkpoint``) instead of from rank 0 alone.

    :return: ``(model_state_dict, [optimizer_state_dict, ...])`` in
        ``trainer.optimizers`` order, or ``None`` to defer.
    """


@hookspec(firstresult=True)
def set_state_dict(
    trainer: Trainer, model_state_dict: Mapping[str, Any], optimizer_state_dicts: list[Any]
) -> bool | None:
    """Called by `hooktrain.Trainer.restore_checkpoint` to load the model's and the
    optimizers' state, before the rest of the checkpoint is restored and before
    ``on_load_checkpoint``.

    The states may come from a run of another form: full tensors from a
    single-file checkpoint, or, from a sharded checkpoint, optimizer states keyed
    by parameter name. The core's default loads full tensors into the model
    (checking every key and shape) and optimizer states keyed either way; a
    sharding plugin shards full tensors on load.

    :param model_state_dict: the checkpoint's ``"model"``.
    :param optimizer_state_dicts: the checkpoint's ``"optimizers"``, one per optimizer.
    :return: ``True`` once loaded, or ``None`` to defer. Any other value (what
        ``load_state_dict`` returned) raises ``PluginError``, as the hook's result
        would otherwise keep the core's default from loading the optimizers.
    :raises ConfigurationError: when the states do not fit the model or optimizers.
    """


@hookspec
def on_save_checkpoint(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Called by `hooktrain.Trainer.dump_checkpoint` after the core filled in
    its own state (model, optimizers, schedulers, progress, RNG states, metrics).

    A plugin adds its own state under ``checkpoint["plugins"][<its name>]``; keep to
    tensors, numbers, strings, lists and dicts so that the checkpoint loads with
    ``torch.load(..., weights_only=True)``.

    :param checkpoint: the mapping being built; change it in place.
    """


@hookspec
def on_load_checkpoint(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Called by `hooktrain.Trainer.restore_checkpoint` after the core restored
    its own state; a plugin reads back what it stored in ``on_save_checkpoint``."""


# --------------------------------------------------------------------------------
# Logging and errors
# --------------------------------------------------------------------------------


@hookspec
def log_metrics(trainer: Trainer, metrics: Mapping[str, float], step: int, scope: str) -> None:
    """Called whenever the loop publishes metrics. Loggers implement this; the core
    never knows which loggers exist.

    :param metrics: name to Python float, named as in ``trainer.metrics``, in name
        order (the same in every run). Reading them cost one device sync, done once
        for all loggers.
    :param step: ``trainer.global_step`` at the time of publishing.
    :param scope: what the values are:

        * ``"step"``: every ``log_every_n_steps`` optimizer steps, the latest values
          (``loss`` and whatever was logged since the previous publication);
        * ``"epoch"``: after each training epoch, the epoch means (``loss``,
          metrics, logged values), and the values logged outside its batches (in
          ``on_train_epoch_start``, say) as they are;
        * ``"validate"`` / ``"test"``: after each validation or test run, the means
          (``val_*`` / ``test_*``).
    """


@hookspec
def on_exception(trainer: Trainer, exception: BaseException) -> None:
    """Called when anything raised during a stage (``KeyboardInterrupt``
    included), before ``teardown``. The exception propagates afterwards. Every
    plugin's implementation runs even when another one raised here (``sys.exit``
    too, which does not end the process from here); those errors are printed to
    stderr, naming the plugin.

    :param exception: the exception, already annotated with the epoch and step.
    """
