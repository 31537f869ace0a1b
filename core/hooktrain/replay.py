"""What a resumed run replays of the epoch a checkpoint interrupted: how the epoch
was split into batches, the random state it started from, and where the training
loader's own generators were. `hooktrain.state` records these in a checkpoint;
`epoch_batches` puts them back as the training loop (`hooktrain.fit_loop`) opens
an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.batches import length
from hooktrain.errors import ResumeWarning, warn_user
from hooktrain.results import iterate
from hooktrain.rng import loader_generators, rng_state, set_rng_state

if TYPE_CHECKING:
    from hooktrain.hookcalls import ResolvedHooks
    from hooktrain.trainer import Trainer

__all__ = [
    "SPLIT",
    "epoch_batches",
    "epoch_split",
    "replay_epoch_start",
    "restore_next_epoch_generators",
    "warn_if_epoch_length_changed",
    "warn_if_workers_persist",
]


def warn_if_workers_persist(loader: Any) -> None:
    """Persistent workers seed their random streams once, when the first epoch
    starts them, and carry them from epoch to epoch; a resumed run starts fresh
    workers, which no checkpoint can put back where the old ones were."""
    if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
        warn_user(
            f"hooktrain: the training dataloader ({type(loader).__name__}) keeps its "
            f"workers between epochs (persistent_workers=True), and their random streams "
            f"are not in the checkpoint: randomness drawn in the workers (augmentation) "
            f"differs from the uninterrupted run's. Use persistent_workers=False for an "
            f"exact resume",
            ResumeWarning,
        )


#: What decides which samples a mid-epoch resume skips, as ``progress`` records it.
SPLIT = {
    "epoch_batches": "batches an epoch",
    "epoch_samples": "samples in the dataset",
    "accumulate_grad_batches": "accumulate_grad_batches",
}


def epoch_split(trainer: Trainer, batches: int | None) -> dict[str, int | None]:
    """The ``SPLIT`` values of the training epoch now, ``batches`` long."""
    return {
        "epoch_batches": batches,
        "epoch_samples": length(getattr(trainer.train_dataloader, "dataset", None)),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
    }


def warn_if_epoch_length_changed(trainer: Trainer, skip: int, total: int | None) -> None:
    """At a mid-epoch resume after ``skip`` batches: warn when the epoch is not split
    as the interrupted one was (``total`` batches now; the dataset's length, the
    accumulation window). A value either side does not know is not compared."""
    saved, trainer._resume_split = trainer._resume_split, None
    saved_total = saved.get("epoch_batches") if saved else None
    # (A checkpoint at an epoch's last batch skips the whole epoch, whatever its split.)
    if not saved or (saved_total is not None and skip >= saved_total):
        return
    now = epoch_split(trainer, total)
    changed = [
        key for key in SPLIT if None not in (saved.get(key), now[key]) and saved[key] != now[key]
    ]
    if not changed:
        return
    if changed == ["accumulate_grad_batches"]:
        harm = "the resumed epoch's optimizer steps group other batches than the run's would"
    else:
        harm = (
            f"skipping {skip} batches of another split trains some samples twice and "
            f"others not at all"
        )
    warn_user(
        f"hooktrain: the checkpoint was taken after batch {skip} of an epoch split otherwise "
        f"({'; '.join(f'{saved[key]} {SPLIT[key]}, now {now[key]}' for key in changed)}: "
        f"another batch size, dataset, limit_train_batches, "
        f"accumulation or number of processes): {harm}",
        ResumeWarning,
    )


def replay_epoch_start(trainer: Trainer, loader: Any, generators: list[torch.Generator]) -> None:
    """At a mid-epoch resume, before the epoch's iterator is created: put back the
    random state the interrupted epoch started from (every global generator, and
    ``generators``, the loader's own), so that the iterator replays its order."""
    saved = trainer._pending_epoch_data
    trainer._pending_epoch_data = None
    if saved is not None:
        set_rng_state(saved["rng"])
        _set_generators(loader, generators, saved.get("generators", []))
    else:
        warn_user(
            "hooktrain: the checkpoint does not hold the epoch's starting random state "
            "(an older checkpoint); the resumed epoch's data may differ",
            ResumeWarning,
        )
    if isinstance(loader, Iterator):
        warn_user(
            f"hooktrain: the training data is an iterator ({type(loader).__name__}), which "
            f"cannot be replayed: the resumed epoch continues from wherever it is now",
            ResumeWarning,
        )


def restore_next_epoch_generators(
    trainer: Trainer, loader: Any, generators: list[torch.Generator]
) -> None:
    """At a resume from an epoch's end, before the next epoch's iterator is created:
    put ``generators`` (the loader's own) where the interrupted run left them."""
    saved, trainer._pending_generators = trainer._pending_generators, None
    if saved is not None:
        _set_generators(loader, generators, saved)


def _set_generators(loader: Any, generators: list[torch.Generator], states: list[Any]) -> None:
    if len(states) == len(generators):
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)
    else:
        warn_user(
            f"hooktrain: the training dataloader ({type(loader).__name__}) has "
            f"{len(generators)} random generator(s) now and {len(states)} in the "
            f"checkpoint: the resumed epoch's order may differ from the interrupted one",
            ResumeWarning,
        )


def epoch_batches(trainer: Trainer, hooks: ResolvedHooks, loader: Any, skip: int) -> Iterator[Any]:
    """The training epoch's batch iterator (``hooks.batch_iterator``'s), created so
    that it draws its seeds (the sampler's order, the workers' base seed) from the
    epoch's starting state.

    That state (every global generator and the loader's own generators) is kept
    for checkpoints; a run resuming in the middle of the epoch puts it back first,
    so the iterator it creates replays the interrupted epoch exactly.
    """
    generators = loader_generators(loader)
    # A checkpoint taken after the iterator was made (at the first batch, too)
    # holds the state it was made from.
    if skip or trainer._pending_epoch_data is not None:
        replay_epoch_start(trainer, loader, generators)
    else:
        restore_next_epoch_generators(trainer, loader, generators)
    trainer._epoch_start_state = {
        "rng": rng_state(),
        "generators": [generator.get_state() for generator in generators],
    }
    iterable = hooks.batch_iterator(
        trainer=trainer, dataloader=loader, stage="train", skip_batches=skip
    )
    return iterate(trainer.plugin_manager, "batch_iterator", iterable)
