"""The core's own implementations of the compute hooks.

They are registered like any plugin, under the name ``core`` and ``trylast``, so
that every other plugin's implementation runs before them and can replace them by
returning a value. When a compute hook has no implementation but this one, the
loop calls it directly and pluggy is not involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import RandomSampler

from hooktrain.batches import (
    STEP_NAMES,
    compiled_step,
    move_to_device,
    predict_inputs,
    skip_first_batches,
    step_arguments,
    unpack_batch,
    user_method,
)
from hooktrain.epoch_metrics import is_epoch_metric, note_failing_metric
from hooktrain.errors import ConfigurationError, missing_checkpoint_message
from hooktrain.markers import hookimpl
from hooktrain.results import origin
from hooktrain.rng import epoch_seeded_generator, mark_epoch_seeded

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer


class CoreDefaults:
    """Plain implementations of every compute hook."""

    name = "core"

    def __init__(self) -> None:
        # Per stage: (trainer.model, the model's own step as run, or None). Looked
        # up, and a compiled step made, at a stage's first batch, not at every one;
        # `prepare` starts afresh, as the model may have been wrapped or given
        # another step since.
        self._user_steps: dict[str, tuple[Any, Any]] = {}

    @hookimpl(trylast=True)
    def prepare(self) -> None:
        self._user_steps.clear()

    @hookimpl(trylast=True)
    def batch_iterator(
        self, trainer: Trainer, dataloader: Iterable[Any], stage: str, skip_batches: int
    ) -> Iterable[Any]:
        if stage == "train":
            self._seed_epoch_order(trainer, dataloader)
        elif trainer.seed is not None and trainer.stage != "fit":
            # A training loader evaluated after its fit still holds the generator
            # the fit gave its sampler, which seeding the stage does not reach:
            # reseeded here, two predicts over it come in one order. Not inside a
            # fit, whose training may be drawing from that generator still.
            sampler = getattr(dataloader, "sampler", None)
            owned = epoch_seeded_generator(sampler)
            if owned is not None and getattr(sampler, "generator", None) is owned:
                owned.manual_seed(trainer.seed)
        return skip_first_batches(dataloader, skip_batches)

    def _seed_epoch_order(self, trainer: Trainer, dataloader: Any) -> None:
        # An epoch's order must depend on (seed, epoch) only, so that a run resumed
        # in the middle of epoch e sees the same permutation as the original.
        epoch = trainer.current_epoch
        set_epoch = getattr(dataloader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return
        sampler = getattr(dataloader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
            return
        if isinstance(sampler, RandomSampler):
            # The generator is marked on the sampler itself, so that another trainer
            # reusing the same DataLoader recognises it as hooktrain's, not the user's.
            owned = epoch_seeded_generator(sampler)
            if sampler.generator is None or sampler.generator is owned:
                if owned is None:
                    owned = sampler.generator = torch.Generator()
                    mark_epoch_seeded(sampler)
                owned.manual_seed(trainer.data_seed + epoch)

    @hookimpl(trylast=True)
    def transfer_batch_to_device(self, trainer: Trainer, batch: Any, device: torch.device) -> Any:
        return move_to_device(batch, device)

    @hookimpl(trylast=True)
    def forward_step(self, trainer: Trainer, batch: Any, batch_idx: int, stage: str) -> Any:
        model = trainer.model
        cached = self._user_steps.get(stage)
        if cached is None or cached[0] is not model:
            cached = self._user_steps[stage] = (model, self._user_step(trainer, stage))
        step = cached[1]
        if step is not None:
            return step(batch, batch_idx)
        if stage == "predict":
            return model(predict_inputs(batch))
        try:
            inputs, targets = unpack_batch(batch, stage)
        except ConfigurationError as exc:
            # The batch may be a plugin's (one that moves batches), not the
            # dataloader's: name it, or the model is blamed.
            by = origin(trainer.plugin_manager, "transfer_batch_to_device")
            raise ConfigurationError(f"{exc}{by}") from None
        try:
            outputs = model(inputs)
        except TypeError as exc:
            if isinstance(inputs, tuple | list) and not _takes(model, inputs):
                # A model of several inputs, given the batch's inputs as one tuple.
                exc.add_note(
                    f"hooktrain: a model without its own {STEP_NAMES[stage]} is called as "
                    f"model(inputs), the inputs as one argument (here a "
                    f"{type(inputs).__name__} of {len(inputs)}); for a forward of several "
                    f"arguments, define {STEP_NAMES[stage]}(batch, batch_idx), or take the "
                    f"{type(inputs).__name__} in forward"
                )
            raise
        if stage == "train":
            try:
                loss = trainer.loss_fn(outputs, targets)
            except TypeError as exc:
                if not isinstance(outputs, torch.Tensor):
                    # torch's own words name neither the model nor the fix.
                    exc.add_note(
                        f"hooktrain: the model returned a {type(outputs).__name__}, given "
                        f"to loss_fn(outputs, targets) as it is: return one tensor from "
                        f"forward, or define training_step(batch, batch_idx)"
                    )
                raise
            return {"loss": loss, "outputs": outputs, "targets": targets}
        return {"outputs": outputs, "targets": targets}

    def _user_step(self, trainer: Trainer, stage: str) -> Any:
        """The module's own step for ``stage`` (``training_step``...), run through
        ``trainer.model`` when that is ``torch.compile``'s wrapper of the module
        (`hooktrain.batches.compiled_step`); ``None`` when it has none."""
        step = user_method(trainer.module, STEP_NAMES[stage])
        if step is None:
            return None
        batch_idx, dataloader_idx = step_arguments(step, stage)
        if trainer.model is not trainer.module:
            step = compiled_step(trainer.model, step)
        if not batch_idx or dataloader_idx:
            return _with_arguments(step, trainer, batch_idx, dataloader_idx)
        return step

    @hookimpl(trylast=True)
    def backward(self, trainer: Trainer, loss: torch.Tensor) -> bool:
        loss.backward()
        return True

    @hookimpl(trylast=True)
    def clip_gradients(
        self, trainer: Trainer, optimizer: torch.optim.Optimizer, max_norm: float
    ) -> torch.Tensor:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    @hookimpl(trylast=True)
    def optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    @hookimpl(trylast=True)
    def compute_metrics(
        self, trainer: Trainer, outputs: Any, targets: Any, stage: str
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        with torch.no_grad():
            if stage != "train" and trainer.loss_fn is not None:
                values["loss"] = trainer.loss_fn(outputs, targets)
            if trainer.metric_fns:
                predicted = outputs.detach() if isinstance(outputs, torch.Tensor) else outputs
                for name, fn in trainer.metric_fns.items():
                    if not is_epoch_metric(fn):
                        try:
                            values[name] = fn(predicted, targets)
                        except Exception as exc:
                            note_failing_metric(exc, name, predicted, targets)
                            raise
                stateful = trainer._epoch_metrics
                if stateful:
                    # Updated only: their values are computed at the epoch's end.
                    stateful.update(predicted, targets)
        return values

    @hookimpl(trylast=True)
    def all_reduce(self, trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
        # One process: the sum over processes is the tensor itself.
        return tensor

    @hookimpl(trylast=True)
    def all_gather_object(self, trainer: Trainer, obj: Any) -> list[Any]:
        # One process: the objects of every process are this one's.
        return [obj]

    @hookimpl(trylast=True)
    def get_state_dict(self, trainer: Trainer) -> tuple[dict[str, Any], list[Any]]:
        return trainer.module.state_dict(), [opt.state_dict() for opt in trainer.optimizers]

    @hookimpl(trylast=True)
    def set_state_dict(
        self,
        trainer: Trainer,
        model_state_dict: Mapping[str, Any],
        optimizer_state_dicts: list[Any],
    ) -> bool:
        from hooktrain.state import load_model_and_optimizers

        load_model_and_optimizers(trainer, model_state_dict, optimizer_state_dicts)
        return True

    @hookimpl(trylast=True)
    def load_checkpoint(self, trainer: Trainer, ckpt_path: str) -> Mapping[str, Any]:
        if ckpt_path == "last":
            raise ConfigurationError(
                "ckpt_path='last' needs a plugin that keeps checkpoints (select "
                "'checkpoint'); the core alone only reads a file path"
            )
        try:
            loaded = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigurationError(missing_checkpoint_message(ckpt_path)) from None
        except IsADirectoryError:
            raise ConfigurationError(
                f"checkpoint {ckpt_path!r} is a directory; the core alone reads a file. "
                f"Select a plugin that keeps checkpoints ('checkpoint') to resume from a "
                f"directory's newest one"
            ) from None
        except Exception as exc:
            raise ConfigurationError(
                f"checkpoint {ckpt_path!r} could not be loaded safely "
                f"(torch.load with weights_only=True): {exc}"
            ) from exc
        from hooktrain.state import require_checkpoint

        require_checkpoint(loaded, ckpt_path)
        return loaded


def _with_arguments(step: Any, trainer: Trainer, batch_idx: bool, dataloader_idx: bool) -> Any:
    # Lightning passes the loader's index to validation_step(batch, batch_idx,
    # dataloader_idx); a step written for it would otherwise see 0 for every loader.
    # It passes batch_idx only to a step that takes it.
    def call(batch: Any, index: int) -> Any:
        arguments = (batch, index) if batch_idx else (batch,)
        if dataloader_idx:
            return step(*arguments, dataloader_idx=trainer.dataloader_idx)
        return step(*arguments)

    return call


def _takes(model: Any, inputs: Any) -> bool:
    """Whether ``model.forward`` can be called with ``inputs`` as its one argument
    (``True`` when its signature cannot be read: nothing is claimed then)."""
    import inspect

    try:
        inspect.signature(model.forward).bind(inputs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True
