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

__all__ = ["fork_rng", "rng_state", "seed_everything", "set_rng_state"]


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
def fork_rng() -> Iterator[None]:
    """Run the block without changing any global generator: Python's, NumPy's,
    torch's CPU and CUDA ones are put back as they were when it ends."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def loader_generators(dataloader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide a dataloader's epoch: its own
    (worker seeds) and its sampler's (the order), in that order, each once.

    A generator the core attached to a sampler (``_hooktrain_generator``, reseeded
    from the run's data seed and the epoch before every epoch) is left out: its
    state at an epoch's start follows from the epoch alone.
    """
    found: list[torch.Generator] = []
    sampler = getattr(dataloader, "sampler", None)
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for owner in (dataloader, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if generator is getattr(owner, "_hooktrain_generator", None):
            continue
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found
