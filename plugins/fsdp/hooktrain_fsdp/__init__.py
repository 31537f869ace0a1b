"""Fully sharded data parallel training for hooktrain, with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``), through hooks only.

Select it with ``Trainer(plugins=["fsdp"])``. The same script then runs

* on one process: ``python train.py`` (a process group of one; the model is
  sharded over one process, so checkpoints have the same form as with N);
* distributed: ``torchrun --nproc_per_node N train.py`` (gloo on the CPU, nccl on
  CUDA), on one machine or several.

What each hook does:

* ``setup``: joins the process group from torchrun's environment, sets
  ``trainer.device``, ``trainer.global_rank`` and ``trainer.world_size``, and
  shards the model: each submodule of the classes in ``auto_wrap_policy`` (by
  default every direct child holding parameters), then the root. This runs before
  the core builds the optimizers, so a callable ``optimizer=`` or the model's
  ``configure_optimizers`` sees the sharded parameters.
* ``prepare``: rebinds a ready-made optimizer to the sharded parameters (or
  refuses it), agrees on the data seed, and gives each process 1/N of the
  training data through a ``DistributedSampler``.
* ``on_train_epoch_start``: points the sampler at the run's data seed (restored
  from a checkpoint on resume).
* ``clip_gradients``, ``all_reduce``, ``all_gather_object``: over every process.
* ``batch_iterator`` (a wrapper) and ``gather_for_metrics``: every process
  evaluates its evaluation loaders as given. Before a loader's first forward the
  processes agree whether it holds the whole set: no ``DistributedSampler``, and the
  same first batch on every process. The outputs of a whole set are handed back as
  already gathered, so that a summing metric counts each sample once, not once per
  process; a loader split per process is combined over the processes as usual.
* ``get_state_dict`` / ``set_state_dict``: the model's and optimizers' state as
  sharded ``DTensor`` values, keyed by parameter name (DCP's form); a checkpoint of
  full tensors (a single-file checkpoint) is sharded on load.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import weakref
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.batches import fingerprint, length
from hooktrain.errors import ConfigurationError
from hooktrain_fsdp.data import has_distributed_sampler, shard_loader

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hooktrain import Trainer

__all__ = ["FSDP", "local_numel"]
__version__ = "0.1.0"

_NOTHING = object()
_SAME_NUMBER_OF_BATCHES = (
    "every forward of a sharded model is a collective, so each process must run as many "
    "batches, and at least one (split an evaluation set with a DistributedSampler, which "
    "pads the shares to one length, or give every process the whole set)"
)

_STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_POLICY_FIELDS = ("param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs")


def local_numel(module: nn.Module) -> int:
    """How many parameter elements this process holds: the local shards of sharded
    parameters, the whole of any other."""
    total = 0
    for parameter in module.parameters():
        to_local = getattr(parameter, "to_local", None)
        total += (to_local() if to_local is not None else parameter).numel()
    return total


class FSDP:
    """Shards parameters, gradients and optimizer state over the processes.

    Option names follow torch's ``fully_shard``.

    :param auto_wrap_policy: the module classes (or class names) whose instances
        are sharded one by one before the root, as in Lightning's ``FSDPStrategy``.
        ``None`` (default) shards every direct child of the model that holds
        parameters. Each sharded module's parameters are gathered for its own
        forward and backward only, which is what bounds memory.
    :param reshard_after_forward: passed to ``fully_shard``: ``True`` frees the
        gathered parameters after forward (and gathers them again for backward),
        ``False`` keeps them until backward, an integer reshards to that many
        processes.
    :param mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, or a
        mapping of its fields (``param_dtype``, ``reduce_dtype``, ``output_dtype``:
        a ``torch.dtype`` or its name such as ``"bfloat16"``; ``cast_forward_inputs``).
        ``None``: parameters stay in their own dtype.
    :param timeout: seconds a collective may wait before the process group fails
        (a process that died leaves the others waiting). It applies to the group the
        plugin creates in ``setup``; a group the script created first keeps the
        timeout it was created with, and the script ends it.
    :raises ConfigurationError: for an unknown ``mp_policy`` field or dtype, an
        ``auto_wrap_policy`` entry that is neither a class nor a string, or a
        ``timeout`` that is not a number > 0; in ``setup``, for an
        ``auto_wrap_policy`` entry that matches no submodule of the model (a
        misspelt class name would otherwise leave the model sharded as one unit).
    """

    name = "fsdp"
    exclusive_roles: tuple[str, ...] = ("distributed",)

    def __init__(
        self,
        auto_wrap_policy: Iterable[type | str] | None = None,
        reshard_after_forward: bool | int = True,
        mp_policy: Any = None,
        timeout: float = 1800.0,
    ) -> None:
        classes = None
        if auto_wrap_policy is not None:
            classes = tuple(auto_wrap_policy)
            bad = [c for c in classes if not isinstance(c, type | str)]
            if bad:
                raise ConfigurationError(
                    f"fsdp: auto_wrap_policy must hold module classes or class names, got {bad!r}"
                )
        self.auto_wrap_policy = classes
        self.reshard_after_forward = reshard_after_forward
        self.mp_policy = _mixed_precision_policy(mp_policy)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(f"fsdp: timeout must be seconds > 0, got {timeout!r}")
        self.timeout = timeout
        #: The device mesh the model is sharded over, from the first ``setup``.
        self.mesh: Any = None
        # The parameters before sharding (by id: a weak reference and the name): a
        # ready-made optimizer holds these. Weak, so that the full tensors are freed
        # once nothing else holds them: each process must keep only its shards.
        self._unsharded: dict[int, tuple[Any, str]] = {}
        # Per evaluation dataloader of the running stage: whether every process
        # holds the whole set (agreed on in batch_iterator).
        self._whole_set: dict[int, bool] = {}

    def __repr__(self) -> str:
        return (
            f"FSDP(auto_wrap_policy={self.auto_wrap_policy!r}, "
            f"reshard_after_forward={self.reshard_after_forward!r})"
        )

    # ------------------------------------------------------------------ setup

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            _init_process_group(self.timeout)
        device = _local_device()
        trainer.device = device
        trainer.global_rank = dist.get_rank()
        trainer.world_size = dist.get_world_size()
        if self.mesh is None:
            self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self._shard(trainer.module)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(module, FSDPModule):
            return  # sharded by an earlier fit or evaluation of this script
        self._unsharded = {id(p): (weakref.ref(p), name) for name, p in module.named_parameters()}
        options: dict[str, Any] = {
            "mesh": self.mesh,
            "reshard_after_forward": self.reshard_after_forward,
        }
        if self.mp_policy is not None:
            options["mp_policy"] = self.mp_policy
        for child in self._units(module):
            fully_shard(child, **options)
        fully_shard(module, **options)
        # A model's own steps call its submodules directly, not through the root's
        # forward, whose hooks gather the root's own parameters: run them under the
        # same hooks.
        for method in _STEP_METHODS:
            if callable(getattr(type(module), method, None)):
                register_fsdp_forward_method(module, method)

    def _units(self, module: nn.Module) -> list[nn.Module]:
        if self.auto_wrap_policy is None:
            return [child for child in module.children() if any(True for _ in child.parameters())]
        wanted = self.auto_wrap_policy

        def is_a(sub: nn.Module, entry: type | str) -> bool:
            return type(sub).__name__ == entry if isinstance(entry, str) else isinstance(sub, entry)

        subs = [sub for sub in module.modules() if sub is not module]
        missing = [entry for entry in wanted if not any(is_a(sub, entry) for sub in subs)]
        if missing:
            present = sorted({type(sub).__name__ for sub in subs})
            raise ConfigurationError(
                f"fsdp: auto_wrap_policy entries {missing!r} match no submodule of the "
                f"{type(module).__name__}; its submodules are {', '.join(present) or 'none'}"
            )
        # Innermost first: fully_shard must see a unit's sharded submodules first.
        units = [sub for sub in subs if any(is_a(sub, entry) for entry in wanted)]
        return list(reversed(units))

    # ------------------------------------------------------------------ prepare

    @hookimpl
    def prepare(self, trainer: Trainer, stage: str) -> None:
        stale, self._unsharded = self._unsharded, {}
        if stage != "fit":
            return
        for optimizer in trainer.optimizers:
            self._rebind(trainer.module, optimizer, stale)
        if trainer.world_size > 1:
            self._agree_on_data_seed(trainer)
            trainer.train_dataloader = shard_loader(
                trainer,
                trainer.train_dataloader,
                lambda mine: self.all_gather_object(trainer, mine),
            )

    def _rebind(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        stale: dict[int, tuple[Any, str]],
    ) -> None:
        """Point an optimizer built before sharding at the sharded parameters."""
        if not stale:
            return
        current = dict(module.named_parameters())
        hint = (
            "pass optimizer= a callable taking the parameters (for example "
            "lambda params: torch.optim.AdamW(params, lr=1e-3)) or define "
            "configure_optimizers(), so that it is built after sharding"
        )
        for group in optimizer.param_groups:
            rebound = []
            for parameter in group["params"]:
                ref, name = stale.get(id(parameter), (None, ""))
                if ref is None or ref() is not parameter:
                    if any(parameter is p for p in current.values()):
                        rebound.append(parameter)  # built after sharding already
                        continue
                    raise ConfigurationError(
                        f"fsdp: the optimizer {type(optimizer).__name__} holds a parameter "
                        f"that is not the model's; {hint}"
                    )
                if optimizer.state.get(parameter):
                    raise ConfigurationError(
                        f"fsdp: the optimizer {type(optimizer).__name__} already has state "
                        f"for {name!r} (it has stepped), which cannot be moved "
                        f"to the sharded parameters; {hint}"
                    )
                rebound.append(current[name])
            group["params"] = rebound
        optimizer.state.clear()

    def _agree_on_data_seed(self, trainer: Trainer) -> None:
        # Without Trainer(seed=...) each process drew its own data seed; rank 0's
        # wins, or the processes would shuffle differently and overlap.
        import torch
        import torch.distributed as dist

        seed = torch.tensor([trainer.data_seed], dtype=torch.int64, device=trainer.device)
        dist.broadcast(seed, src=0)
        trainer.data_seed = int(seed.item())

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if getattr(sampler, "hooktrain_fsdp", False):
            sampler.seed = trainer.data_seed  # type: ignore[union-attr]

    # ------------------------------------------------------------------ compute

    @hookimpl
    def clip_gradients(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        import torch

        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        # The norm of sharded gradients is a DTensor; the loop logs a plain tensor.
        full_tensor = getattr(norm, "full_tensor", None)
        return full_tensor() if full_tensor is not None else norm

    @hookimpl(wrapper=True)
    def batch_iterator(
        self, trainer: Trainer, dataloader: Any, stage: str
    ) -> Generator[None, Iterable[Any], Iterable[Any]]:
        # Every process evaluates its loaders as given: the whole set, unless the
        # user split it (a DistributedSampler, a Subset or a dataset per rank).
        # Outputs of the whole set are already every sample's, each once; combining
        # their metrics over the processes would count a sum (samples seen, a
        # SumMetric) once per process. Which it is, the processes agree on before
        # the first forward, from the loader's sampler and first batch.
        iterable = yield
        if stage not in ("validate", "test") or trainer.world_size <= 1:
            return iterable
        return self._agree_on_whole_set(trainer, dataloader, stage, iterable)

    def _agree_on_whole_set(
        self, trainer: Trainer, dataloader: Any, stage: str, iterable: Iterable[Any]
    ) -> Iterator[Any]:
        # A generator, so that nothing is drawn or compared until the loop asks for
        # a batch (limit_val_batches=0 asks for none), and the first batch's loading
        # is timed as data loading.
        index = trainer.dataloader_idx
        iterator = iter(iterable)
        first = next(iterator, _NOTHING)
        if has_distributed_sampler(dataloader):
            mine: Any = "split"
        else:
            mine = "empty" if first is _NOTHING else fingerprint(first)
        # How many batches this process will run; None for a loader without a
        # length, whose count limit_val_batches caps but does not tell.
        batches = trainer.num_eval_batches[index] if length(dataloader) is not None else None
        everyone = self.all_gather_object(trainer, (mine, batches))
        kinds = [theirs for theirs, _ in everyone]
        counts = [count for _, count in everyone]
        if "empty" in kinds:
            idle = ", ".join(str(rank) for rank, theirs in enumerate(kinds) if theirs == "empty")
            raise ConfigurationError(
                f"fsdp: the {stage} dataloader {index} yields no batches on process "
                f"{idle}; {_SAME_NUMBER_OF_BATCHES}"
            )
        if None not in counts and len(set(counts)) > 1:
            # A process running more batches would wait in a forward's collective
            # for the others, which have gone on to the metrics' reduction.
            each = ", ".join(f"{count} on process {rank}" for rank, count in enumerate(counts))
            raise ConfigurationError(
                f"fsdp: the {stage} dataloader {index} yields {each}; {_SAME_NUMBER_OF_BATCHES}"
            )
        self._whole_set[index] = mine != "split" and all(theirs == mine for theirs in kinds)
        if first is not _NOTHING:
            yield first
            yield from iterator

    @hookimpl
    def gather_for_metrics(
        self, trainer: Trainer, outputs: Any, targets: Any
    ) -> tuple[Any, Any] | None:
        # A whole set's outputs are handed back as if gathered (see batch_iterator).
        if self._whole_set.get(trainer.dataloader_idx):
            return outputs, targets
        return None

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        reduced = tensor.clone()
        dist.all_reduce(reduced)
        return reduced

    @hookimpl
    def all_gather_object(self, trainer: Trainer, obj: Any) -> list[Any] | None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    # ------------------------------------------------------------------ state

    @hookimpl
    def get_state_dict(self, trainer: Trainer) -> tuple[dict[str, Any], list[Any]]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        module = trainer.module
        return get_model_state_dict(module), [
            get_optimizer_state_dict(module, optimizer) for optimizer in trainer.optimizers
        ]

    @hookimpl
    def set_state_dict(
        self,
        trainer: Trainer,
        model_state_dict: Mapping[str, Any],
        optimizer_state_dicts: Sequence[Any],
    ) -> bool:
        from hooktrain_fsdp.state import load_into_sharded

        load_into_sharded(trainer, model_state_dict, optimizer_state_dicts)
        return True


def _mixed_precision_policy(value: Any) -> Any:
    if value is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if isinstance(value, MixedPrecisionPolicy):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"fsdp: mp_policy must be a MixedPrecisionPolicy or a mapping of its fields, "
            f"got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(_POLICY_FIELDS))
    if unknown:
        raise ConfigurationError(
            f"fsdp: mp_policy has no field {', '.join(unknown)}; its fields are "
            f"{', '.join(_POLICY_FIELDS)}"
        )
    import torch

    fields: dict[str, Any] = {}
    for key, item in value.items():
        if key != "cast_forward_inputs" and isinstance(item, str):
            dtype = getattr(torch, item, None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigurationError(f"fsdp: mp_policy {key}={item!r} is not a torch dtype")
            item = dtype
        fields[key] = item
    return MixedPrecisionPolicy(**fields)


def _local_device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _init_process_group(timeout: float) -> None:
    """Join the process group torchrun describes in the environment, or make one of
    a single process for a plain ``python train.py``."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    limit = datetime.timedelta(seconds=timeout)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=limit)
    else:
        # No rendezvous to reach: an in-memory store is enough for one process.
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=limit
        )
    _destroy_process_group_at_exit()


_exit_cleanup_registered = False


def _destroy_process_group_at_exit() -> None:
    """Meet the other processes, then destroy the process group, at interpreter exit.

    The group outlives ``fit`` so that a script can still gather full weights after
    it; a gloo process whose peer exits while its work is in flight can abort, so
    every process first waits for the others (bounded, in case one died).
    """
    global _exit_cleanup_registered
    if _exit_cleanup_registered:
        return
    _exit_cleanup_registered = True

    def destroy() -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        try:
            # Not after an uncaught exception (sys.last_value set): see
            # hooktrain_accelerate.processes, whose barrier this is too.
            dying = getattr(sys, "last_value", None) is not None
            if not dying and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception as exc:
            print(f"hooktrain-fsdp: processes did not meet at exit: {exc}", file=sys.stderr)
        dist.destroy_process_group()

    atexit.register(destroy)
