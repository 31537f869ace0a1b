"""The fsdp plugin's data side: splitting the training loader over the processes,
and telling an evaluation loader each process holds whole from one split among
them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hooktrain.batches import fingerprint
from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from hooktrain import Trainer


def has_distributed_sampler(loader: Any) -> bool:
    from torch.utils.data import DistributedSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    return isinstance(getattr(loader, "sampler", None), DistributedSampler) or isinstance(
        getattr(batch_sampler, "sampler", None), DistributedSampler
    )


def shard_loader(trainer: Trainer, loader: Any, gather: Callable[[Any], list[Any]]) -> Any:
    """``loader`` over 1/N of its dataset: a ``DistributedSampler`` over the same
    dataset, shuffling when the loader did, with the same batch size and collation.
    A loader whose sampler is a ``DistributedSampler`` already is split: it is
    returned as it is.

    ``gather`` collects one object from every process (a collective: every process
    calls this).

    :raises ConfigurationError: for a loader that cannot be rebuilt (an iterable
        dataset, a custom batch sampler), one whose sampler picks or weighs
        samples (``SubsetRandomSampler``, ``WeightedRandomSampler``, a random
        sampler with replacement...), which the rebuilt loader would not, or one
        whose dataset differs between the processes (split by hand already).
    """
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        DistributedSampler,
        IterableDataset,
        RandomSampler,
        SequentialSampler,
    )

    if (
        type(loader) is not DataLoader
        or isinstance(loader.dataset, IterableDataset)
        or type(loader.batch_sampler) is not BatchSampler
    ):
        got = type(loader).__name__
        if isinstance(loader, DataLoader):
            dataset, batches = type(loader.dataset).__name__, type(loader.batch_sampler).__name__
            got = f"a {got} over a {dataset}, with a {batches}"
        raise ConfigurationError(
            f"fsdp: the training loader must be a torch DataLoader over a map-style dataset "
            f"with a batch_size, to be split across processes; got {got}"
        )
    if isinstance(loader.sampler, DistributedSampler):
        split = (loader.sampler.num_replicas, loader.sampler.rank)
        if split != (trainer.world_size, trainer.global_rank):
            raise ConfigurationError(
                f"fsdp: the training loader's DistributedSampler splits the data for "
                f"process {split[1]} of {split[0]}, but this is process "
                f"{trainer.global_rank} of {trainer.world_size}; build it with "
                f"num_replicas=int(os.environ['WORLD_SIZE']) and "
                f"rank=int(os.environ['RANK']) (torchrun sets both; the process group "
                f"is created only inside fit), or leave it out"
            )
        return loader
    whole = type(loader.sampler) is SequentialSampler or (
        type(loader.sampler) is RandomSampler
        and not loader.sampler.replacement
        and loader.sampler.num_samples == len(loader.dataset)
    )
    if not whole:
        # Rebuilt over the whole dataset, it would train on samples the sampler
        # left out, in another order, without a word.
        raise ConfigurationError(
            f"fsdp: the training loader's sampler ({type(loader.sampler).__name__}) picks "
            f"or weighs samples, which splitting the dataset across processes would "
            f"lose; give the loader a DistributedSampler of your own (it is then used "
            f"as it is), or a torch.utils.data.Subset of the dataset with shuffle=True"
        )
    # A Subset per process, split by hand, would be split again: each process would
    # train on about 1/N of its share, without a word.
    size = len(loader.dataset)
    everyone = gather((size, fingerprint(loader.dataset[0]) if size else None))
    if any(theirs != everyone[0] for theirs in everyone[1:]):
        sizes = ", ".join(f"{theirs[0]} on process {rank}" for rank, theirs in enumerate(everyone))
        raise ConfigurationError(
            f"fsdp: the training loader holds a different dataset on each process "
            f"(samples: {sizes}; or another first sample): split by hand, it would be "
            f"split again, each process training on about 1/N of its share. Give every "
            f"process the whole dataset, or a DistributedSampler of your own"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=trainer.world_size,
        rank=trainer.global_rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=trainer.data_seed,
    )
    sampler.hooktrain_fsdp = True  # type: ignore[attr-defined]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        generator=loader.generator,
    )
