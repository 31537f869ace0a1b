"""The core's own implementations of the compute hooks.

They are registered like any plugin, under the name ``core`` and ``trylast``, so
that every other plugin's implementation runs before them and can replace them by
returning a value. When a compute hook has no implementation but this one, the
loop calls it directly and pluggy is not involved.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler

from hooktrain.errors import ConfigurationError
from hooktrain.markers import hookimpl

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

_EVAL_STEP_NAMES = {
    "train": "training_step",
    "validate": "validation_step",
    "test": "test_step",
    "predict": "predict_step",
}


def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts on ``device``.

    Returns ``obj`` itself when nothing had to move, so the common case allocates
    nothing.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    cls = type(obj)
    if cls is tuple or cls is list:
        # The usual batch, a pair of tensors already in place (pre-batched data, the
        # CPU), is settled in one pass without a call per item.
        for item in obj:
            if not isinstance(item, torch.Tensor) or item.device != device:
                break
        else:
            return obj
        moved = [move_to_device(item, device) for item in obj]
        if all(a is b for a, b in zip(moved, obj, strict=True)):
            return obj
        return cls(moved)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return cls(*(move_to_device(item, device) for item in obj))
    if isinstance(obj, Mapping):
        return {key: move_to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return cls(move_to_device(item, device) for item in obj)
    return obj


_MODULE_GETATTR = torch.nn.Module.__getattr__


def _user_method(module: Any, name: str) -> Any:
    """``getattr(module, name, None)``, without its cost for a plain module.

    A name an ``nn.Module`` lacks goes through ``Module.__getattr__``, which builds
    and raises an AttributeError: a microsecond on every step for a model without
    ``training_step``. The same places are looked up here without raising.
    """
    cls = type(module)
    if getattr(cls, "__getattr__", None) is not _MODULE_GETATTR:
        return getattr(module, name, None)  # a wrapper that forwards attributes
    state = module.__dict__
    if (
        name in state
        or hasattr(cls, name)
        or name in state.get("_parameters", ())
        or name in state.get("_buffers", ())
        or name in state.get("_modules", ())
    ):
        return getattr(module, name)
    return None


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, with an error that says what was received."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    described = (
        f"a {type(batch).__name__} of length {len(batch)}"
        if isinstance(batch, tuple | list)
        else f"a {type(batch).__name__}"
    )
    raise ConfigurationError(
        f"cannot unpack the batch into (inputs, targets): got {described}. A model "
        f"without its own training_step needs batches of two items (inputs, targets) "
        f"or a dict with 'inputs' and 'targets'; otherwise define training_step(batch, "
        f"batch_idx) on the model."
    )


class _SkipFirstBatches(Sampler[list[int]]):
    """A batch sampler that drops the first ``skip`` batches of another, by index.

    Only indices are skipped: the dataset is never asked for the skipped samples.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def skip_first_batches(dataloader: Iterable[Any], skip: int) -> Iterable[Any]:
    """``dataloader`` without its first ``skip`` batches, loading none of them when
    it is a plain map-style ``DataLoader``; other iterables are advanced."""
    if skip <= 0:
        return dataloader
    if (
        type(dataloader) is DataLoader
        and not isinstance(dataloader.dataset, IterableDataset)
        and dataloader.batch_sampler is not None
    ):
        workers = dataloader.num_workers
        return DataLoader(
            dataloader.dataset,
            batch_sampler=_SkipFirstBatches(dataloader.batch_sampler, skip),
            num_workers=workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
            generator=dataloader.generator,
            prefetch_factor=dataloader.prefetch_factor if workers else None,
            persistent_workers=dataloader.persistent_workers if workers else False,
            pin_memory_device=dataloader.pin_memory_device,
        )
    iterator = iter(dataloader)
    for _ in itertools.islice(iterator, skip):
        pass
    return iterator


class CoreDefaults:
    """Plain implementations of every compute hook."""

    name = "core"

    @hookimpl(trylast=True)
    def batch_iterator(
        self, trainer: Trainer, dataloader: Iterable[Any], stage: str, skip_batches: int
    ) -> Iterable[Any]:
        if stage == "train":
            self._seed_epoch_order(trainer, dataloader)
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
            owned = getattr(sampler, "_hooktrain_generator", None)
            if sampler.generator is None or sampler.generator is owned:
                if owned is None:
                    owned = torch.Generator()
                    sampler._hooktrain_generator = owned  # type: ignore[attr-defined]
                    sampler.generator = owned
                owned.manual_seed(trainer.data_seed + epoch)

    @hookimpl(trylast=True)
    def transfer_batch_to_device(self, trainer: Trainer, batch: Any, device: torch.device) -> Any:
        return move_to_device(batch, device)

    @hookimpl(trylast=True)
    def forward_step(self, trainer: Trainer, batch: Any, batch_idx: int, stage: str) -> Any:
        step = _user_method(trainer.module, _EVAL_STEP_NAMES[stage])
        if step is not None:
            return step(batch, batch_idx)
        if stage == "predict":
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            return trainer.model(inputs)
        inputs, targets = unpack_batch(batch)
        outputs = trainer.model(inputs)
        if stage == "train":
            return {
                "loss": trainer.loss_fn(outputs, targets),
                "outputs": outputs,
                "targets": targets,
            }
        return {"outputs": outputs, "targets": targets}

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
    def all_reduce(self, trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
        # One process: the sum over processes is the tensor itself.
        return tensor

    @hookimpl(trylast=True)
    def load_checkpoint(self, trainer: Trainer, ckpt_path: str) -> Mapping[str, Any]:
        if ckpt_path == "last":
            raise ConfigurationError(
                "ckpt_path='last' needs a plugin that keeps checkpoints (select "
                "'checkpoint'); the core alone only reads a file path"
            )
        try:
            return torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigurationError(f"checkpoint {ckpt_path!r} does not exist") from None
        except Exception as exc:
            raise ConfigurationError(
                f"checkpoint {ckpt_path!r} could not be loaded safely "
                f"(torch.load with weights_only=True): {exc}"
            ) from exc
