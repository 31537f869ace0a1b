"""Random number generators: seeding, saving and restoring them.

A run is reproducible when every generator that decides something (Python's
``random``, NumPy's global generator, torch's CPU and CUDA generators, and the
generators a dataloader or its sampler carry) is in the same state at the same
point. The states are kept as tensors and plain lists so that a checkpoint holding
them loads with ``torch.load(weights_only=True)``: no NumPy objects, no pickled
classes.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "epoch_seeded_generator",
    "fork_rng",
    "loader_generators",
    "mark_epoch_seeded",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]

#: The attribute `mark_epoch_seeded` sets on a generator's owner.
_EPOCH_SEEDED = "_hooktrain_generator"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed) and torch (every device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """The state of every global generator, as tensors, numbers and strings."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # One int64 tensor rather than a list of 625 ints: pickling the list went
        # through torch.save's per-object hook 625 times, about 0.3 ms a checkpoint.
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put every global generator back in ``state`` (from `rng_state`)."""
    python = state["python"]
    internal = python["state"]
    if isinstance(internal, torch.Tensor):
        internal = internal.tolist()
    random.setstate((python["version"], tuple(internal), python["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        np_state = state["numpy"]
        numpy.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype("uint32"),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached"],
            )
        )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def fork_rng(*dataloaders: Any) -> Iterator[dict[str, Any]]:
    """Run the block without changing any global generator: Python's, NumPy's,
    torch's CPU and CUDA ones are put back as they were when it ends. Gives the
    state it puts back (`rng_state`'s).

    The own generators of ``dataloaders`` (`loader_generators`, the epoch-seeded
    one included) are put back as well. Another loader iterated in the
    block (one given the same generator, or the same loader) draws from them
    otherwise; a sampler with ``replacement=True`` draws its indices as its epoch
    goes, so an epoch under way would change, unseen by a resume that replays it.
    """
    saved = rng_state()
    generators = [g for loader in dataloaders for g in loader_generators(loader, epoch_seeded=True)]
    states = [generator.get_state() for generator in generators]
    try:
        yield saved
    finally:
        set_rng_state(saved)
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def loader_generators(dataloader: Any, epoch_seeded: bool = False) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide a dataloader's epoch: its own
    (worker seeds) and its sampler's (the order), in that order, each once.

    A generator marked with `mark_epoch_seeded` (the one the core attaches to a
    ``RandomSampler``, or a plugin's) is left out unless ``epoch_seeded``: it is
    reseeded from the run's data seed and the epoch before every epoch, so its
    state at an epoch's start follows from the epoch alone, and a checkpoint need
    not hold it.
    """
    found: list[torch.Generator] = []
    sampler = getattr(dataloader, "sampler", None)
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for owner in (dataloader, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if not epoch_seeded and generator is epoch_seeded_generator(owner):
            continue
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def mark_epoch_seeded(owner: Any) -> None:
    """Say that ``owner.generator`` (a sampler's ``torch.Generator``) is reseeded from
    the run's seed and the epoch before every epoch, so that `loader_generators`
    leaves it out of the epoch's starting state.

    Without the mark, a sampler that creates its generator lazily (at its first
    epoch) has none in a checkpoint of epoch 0 and one afterwards, and a run resumed
    in a fresh process warns (`hooktrain.ResumeWarning`) that the counts differ.

    :raises ValueError: when ``owner.generator`` is not a ``torch.Generator``.
    """
    generator = getattr(owner, "generator", None)
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"mark_epoch_seeded needs an object whose .generator is a torch.Generator, "
            f"got {type(generator).__name__} on {type(owner).__name__}"
        )
    setattr(owner, _EPOCH_SEEDED, generator)


def epoch_seeded_generator(owner: Any) -> torch.Generator | None:
    """The generator `mark_epoch_seeded` marked on ``owner``, or ``None``."""
    return getattr(owner, _EPOCH_SEEDED, None)
