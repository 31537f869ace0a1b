"""The accelerate plugin's dataloader helpers: the epoch's iterator and its order."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

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
