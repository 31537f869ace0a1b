"""The accelerate plugin's dataloader helpers: the epoch's iterator and its order, and
the data it refuses to run on several processes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from hooktrain.batches import fingerprint
from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from accelerate import Accelerator

_MISSING = object()


def started(loader: Iterable[Any]) -> Iterable[Any]:
    """``loader``'s iterator with its first batch already drawn.

    accelerate's loaders create the torch DataLoader iterator only at the first
    ``next``, and that is when it draws its base seed from torch's global
    generator. The core expects the draw when the epoch's iterator is made: a
    run resuming mid-epoch puts back the epoch's starting random state, makes the
    iterator, and then puts back the state of the moment it was saved. A draw
    after that would shift every later random number (dropout's), so the
    resumed run would not be the uninterrupted one.
    """
    iterator = iter(loader)
    first = next(iterator, _MISSING)
    return iterator if first is _MISSING else itertools.chain((first,), iterator)


def seed_sampler(dataloader: Any, seed: int) -> None:
    """Point accelerate's seedable sampler at the run's data seed (restored from a
    checkpoint on resume), so that an epoch's order depends on (seed, epoch) only.

    The sampler makes its generator at its first epoch and reseeds it every epoch;
    it is made here and marked as reseeded (`hooktrain.rng.mark_epoch_seeded`), or
    checkpoints of epoch 0 would hold no generator and later ones one, and a resume
    in a fresh process would warn that the counts differ."""
    import torch

    from hooktrain.rng import mark_epoch_seeded

    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for holder in (batch_sampler, getattr(batch_sampler, "batch_sampler", None)):
        sampler = getattr(holder, "sampler", None)
        if sampler is not None and hasattr(sampler, "initial_seed"):
            sampler.initial_seed = seed
            if getattr(sampler, "generator", None) is None:
                sampler.generator = torch.Generator()
            mark_epoch_seeded(sampler)


def refuse_split_loaders(loaders: list[Any]) -> None:
    """:raises ConfigurationError: for a loader with a ``DistributedSampler``, which
    ``accelerator.prepare`` would split a second time (each process would see
    1/N of its 1/N share), without a word."""
    from torch.utils.data import DistributedSampler

    for loader in loaders:
        samplers = (
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        )
        if any(isinstance(s, DistributedSampler) and s.num_replicas > 1 for s in samplers):
            raise ConfigurationError(
                "accelerate: a dataloader has a DistributedSampler, but accelerate splits "
                "dataloaders across processes itself, so each process would see only 1/N "
                "of its share; pass the loader without it (shuffle=True, or the sampler "
                "you would have wrapped)"
            )


def refuse_unsplittable_training_data(loader: Any, accelerator: Accelerator) -> None:
    """:raises ConfigurationError: with several processes, for training data that is
    not a torch ``DataLoader`` (a list of batches, a generator): ``accelerator.prepare``
    returns it unsplit, and every process would train on all of it, the run
    repeating a one-process run at N times the cost."""
    from torch.utils.data import DataLoader

    if accelerator.num_processes > 1 and not isinstance(loader, DataLoader):
        raise ConfigurationError(
            f"accelerate: the training data must be a torch DataLoader to be split "
            f"across the {accelerator.num_processes} processes; got "
            f"{type(loader).__name__}, which every process would train on whole"
        )


def refuse_hand_split_loaders(loaders: dict[str, Any], gather: Callable[[Any], list[Any]]) -> None:
    """:raises ConfigurationError: for a ``DataLoader`` over a map-style dataset that
    differs between the processes (in length, or in its first sample): split by
    hand (a ``Subset`` per rank), which ``accelerator.prepare`` would split a
    second time, so that each process trained or evaluated about 1/N of its share
    and reported numbers of its own, without a word. ``loaders`` maps a name for
    the error to each loader. Every process must call it, with the same names:
    ``gather`` is a collective."""
    from torch.utils.data import DataLoader, IterableDataset

    def describe(loader: Any) -> Any:
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            return None
        size = len(loader.dataset)  # type: ignore[arg-type]
        return [size, fingerprint(loader.dataset[0]) if size else None]

    everyone = gather([describe(loader) for loader in loaders.values()])
    for index, name in enumerate(loaders):
        if any(theirs[index] != everyone[0][index] for theirs in everyone[1:]):
            sizes = ", ".join(
                f"{theirs[index][0]} on process {rank}" for rank, theirs in enumerate(everyone)
            )
            raise ConfigurationError(
                f"accelerate: the {name} holds a different dataset on each process "
                f"(samples: {sizes}; or another first sample): split by hand, it would "
                f"be split again by accelerate, each process seeing about 1/N of its "
                f"share; give every process the whole dataset"
            )
