"""Sharded checkpoints: one directory, written by every process through
``torch.distributed.checkpoint`` (DCP), committed by one rename.

A model whose state holds ``DTensor`` values (each process holds a shard, as under
the ``fsdp`` plugin) cannot be written by rank 0 alone. Such a checkpoint is a
directory ``NAME.ckpt/`` holding:

* DCP's files: ``.metadata`` and ``__<rank>_<n>.distcp``, with the tensors of the
  model and the optimizers only (every process writes its own shards);
* ``state.ckpt``: everything else (progress, RNG states, metrics, plugins' state,
  the optimizers' hyperparameters), written by rank 0 as an ordinary checkpoint
  file with its SHA-256 record. The record also holds the SHA-256 of every DCP
  file, and the progress that ``last`` and top-k bookkeeping read.

Every process writes into a hidden temporary directory; when all are done
(a barrier), rank 0 renames it to its name. A save killed at any moment leaves no
directory under a checkpoint's name.

Loading is safe: DCP's ``.metadata`` is a pickle, so it is read with an unpickler
that accepts only DCP's own metadata classes and a few torch types (a planted
file naming anything else is refused before anything from it runs); the tensors
are read with ``torch.load(weights_only=True)`` by DCP itself; no non-tensor item
is ever read from DCP's files.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.state import check_count, check_optimizer_kind
from hooktrain_checkpoint import storage

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["is_sharded", "load", "remove", "save", "verify", "write_directory"]

STATE_FILE = storage.STATE_FILE
_MODEL = "model"
_OPTIMIZER = "optimizer{}"


def is_sharded(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the model state holds ``DTensor`` values (shards of this process)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build of torch without distributed support
        return False
    return any(isinstance(v, DTensor) for v in checkpoint["model"].values())


# ---------------------------------------------------------------------- splitting


def _split(value: Any) -> tuple[Any, Any]:
    """``(tensors, rest)`` of a nested mapping: the tensors keep their paths, and
    the rest holds every other leaf (a tensor's place in it holds ``None``)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value, None
    if isinstance(value, Mapping):
        tensors, rest = {}, {}
        for key, item in value.items():
            t, r = _split(item)
            if t is not None:
                tensors[str(key)] = t
            rest[key] = r
        return (tensors or None), rest
    return None, value


def _merge(tensors: Any, rest: Any) -> Any:
    """The inverse of `_split`, keys of ``rest`` winning (their original types)."""
    if not isinstance(rest, Mapping):
        return tensors if rest is None and tensors is not None else rest
    merged = {}
    for key, item in rest.items():
        sub = tensors.get(str(key)) if isinstance(tensors, Mapping) else None
        merged[key] = _merge(sub, item)
    return merged


def _tensor_state(model: Mapping[str, Any], optimizers: list[Any]) -> tuple[dict, list[Any]]:
    state: dict[str, Any] = {_MODEL: dict(model)}
    rests = []
    for i, optimizer in enumerate(optimizers):
        tensors, rest = _split(optimizer)
        state[_OPTIMIZER.format(i)] = tensors or {}
        rests.append(rest)
    return state, rests


# ---------------------------------------------------------------------- saving


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(
    trainer: Trainer,
    checkpoint: dict[str, Any],
    target: Path,
    record: Mapping[str, Any],
    also: Path | None = None,
) -> None:
    """Write ``checkpoint`` (from ``dump_checkpoint``, sharded) as the directory
    ``target``, and with ``also`` a second copy there (``last``). A collective:
    every process calls it with the same arguments.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    names: list[Any] = [None]
    if dist.get_rank() == 0:
        names[0] = os.fspath(storage._temp_path(target))
    dist.broadcast_object_list(names, src=0)
    temp = Path(names[0])
    tensors, optimizer_rests = _tensor_state(checkpoint["model"], checkpoint["optimizers"])
    dcp.save(tensors, checkpoint_id=temp)
    # Each process hashes the files it wrote; rank 0 hashes the metadata.
    rank = dist.get_rank()
    own = {p.name: _digest(p) for p in temp.glob(f"__{rank}_*.distcp")}
    if rank == 0:
        own[".metadata"] = _digest(temp / ".metadata")
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, own)
    if rank == 0:
        files = {name: digest for part in everyone for name, digest in part.items()}
        rest = {**checkpoint, "model": {}, "optimizers": optimizer_rests}
        full_record = {**record, "sharded": True, "world_size": len(everyone), "files": files}
        storage.write_file(rest, temp / STATE_FILE, full_record)
        write_directory(temp, target)
        if also is not None:
            copy = storage._temp_path(also)
            copy.mkdir()
            for item in target.iterdir():
                storage.link_or_copy(item, copy / item.name)
            write_directory(copy, also)
    dist.barrier()


def write_directory(temp: Path, target: Path) -> None:
    """Rename the complete directory ``temp`` to ``target``, replacing a checkpoint of
    either kind there (see `storage.replace`)."""
    storage._fsync_directory(temp)
    if target.exists() and not target.is_dir():
        target.unlink()  # os.replace cannot put a directory over a file
    storage.replace(temp, target)
    storage._fsync_directory(target.parent)


def remove(path: Path) -> None:
    """Delete a checkpoint of either kind (a file or a sharded directory)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- reading


def verify(path: Path) -> tuple[dict[str, Any], storage.CheckpointInfo]:
    """Check every file of a sharded checkpoint against its record; load the
    ``state.ckpt`` part (``weights_only``).

    :raises storage.DamagedCheckpointError: a file missing (``state.ckpt`` too) or
        altered.
    """
    if not (path / STATE_FILE).is_file():
        raise storage.DamagedCheckpointError(path, f"its {STATE_FILE} is missing")
    state, info = storage.load_file(path / STATE_FILE, require_record=True)
    assert info is not None
    files = info.record.get("files", {})
    if ".metadata" not in files:
        raise storage.DamagedCheckpointError(path, "its record lists no DCP metadata")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise storage.DamagedCheckpointError(path, f"{name} is missing")
        if _digest(file) != expected:
            raise storage.DamagedCheckpointError(path, f"the SHA-256 of {name} does not match")
    return state, storage.CheckpointInfo(path, info.record, info.covered_bytes)


def load(trainer: Trainer, path: Path) -> tuple[dict[str, Any], storage.CheckpointInfo]:
    """Read a sharded checkpoint into the shape of this run's model and optimizers.

    The model and optimizer states come back in the form of
    ``torch.distributed.checkpoint.state_dict`` for this run: ``DTensor`` shards
    under a sharding plugin (of any number of processes: DCP reshards), full
    tensors in a plain single-process run. The optimizers' non-tensor state comes
    from ``state.ckpt``.

    :raises storage.DamagedCheckpointError: when verification fails.
    :raises storage.UnsafeCheckpointError: when the metadata names anything beyond
        DCP's own classes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state, info = verify(path)
    # Read once here so that a refusal reaches the caller as itself (inside DCP's
    # load it would come back wrapped in a CheckpointException).
    SafeReader(path).read_metadata()
    # Before DCP reads into this run's layout: a state of another optimizer class
    # would fail there on a missing key, in a CheckpointException.
    saved_rests = list(state.get("optimizers", []))
    check_count("optimizer(s)", trainer.optimizers, saved_rests)
    for index, (optimizer, rest) in enumerate(zip(trainer.optimizers, saved_rests, strict=True)):
        check_optimizer_kind(index, optimizer, rest)
    module = trainer.module
    model = get_model_state_dict(module)
    optimizers = [get_optimizer_state_dict(module, opt) for opt in trainer.optimizers]
    tensors, _ = _tensor_state(model, optimizers)
    dcp.load(tensors, checkpoint_id=path, storage_reader=SafeReader(path))
    state["model"] = tensors[_MODEL]
    state["optimizers"] = [
        _merge(tensors[_OPTIMIZER.format(i)], rest) for i, rest in enumerate(saved_rests)
    ]
    return state, info


# ---------------------------------------------------------------------- safe metadata

#: Modules whose own classes (dataclasses and enums, nothing else) DCP's
#: ``.metadata`` pickle may name.
_CLASS_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
#: Further names it may hold: the torch types its fields hold, and the path DCP
#: records as the checkpoint's id.
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global beyond DCP's metadata classes and the names above, so
    that no function a planted file names can be called while loading it."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        found = super().find_class(module, name) if self._allowed(module, name) else None
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _ALLOWED:
            return True
        if module in _CLASS_MODULES:
            import importlib

            owner = importlib.import_module(module)
            found = getattr(owner, name, None)
            return isinstance(found, type) and found.__module__ == module
        return False


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file-system reader, reading ``.metadata`` without running pickled code."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            data = (Path(self.path) / ".metadata").read_bytes()
            try:
                metadata = _RestrictedUnpickler(io.BytesIO(data)).load()
            except pickle.UnpicklingError as exc:
                raise storage.UnsafeCheckpointError(self.path, str(exc)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def SafeReader(path: Path) -> Any:
    """A ``FileSystemReader`` for ``path`` whose metadata loading runs no pickled code."""
    return _safe_reader_class()(os.fspath(path))


# ---------------------------------------------------------------------- inspecting


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor a sharded checkpoint holds, by DCP's flattened name
    (``model.<parameter>``, ``optimizer<i>.state.<parameter>.<key>``), with its full
    shape, read from the metadata alone (safely)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeReader(path).read_metadata()
    return {
        name: tuple(item.size)
        for name, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def consolidate(path: Path, out: Path) -> int:
    """Write the sharded checkpoint ``path`` as one single-file checkpoint ``out``
    (full tensors; optimizer states keyed by parameter name), which a plain run, or
    a sharded run of any size, resumes from. Runs in one process, without a process
    group; it needs memory for the whole state.

    :return: the size of ``out`` in bytes.
    :raises storage.DamagedCheckpointError: when verification fails.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state, info = verify(path)
    reader = SafeReader(path)
    metadata = reader.read_metadata()
    flat = {
        name: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for name, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    dcp.load(flat, storage_reader=SafeReader(path), no_dist=True)
    prefix = _MODEL + "."
    state["model"] = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    optimizers = []
    for i, rest in enumerate(state.get("optimizers", [])):
        head = f"{_OPTIMIZER.format(i)}.state."
        rebuilt = {
            parameter: {
                key: flat.get(f"{head}{parameter}.{key}", value) for key, value in entries.items()
            }
            for parameter, entries in rest.get("state", {}).items()
        }
        optimizers.append({**rest, "state": rebuilt})
    state["optimizers"] = optimizers
    record = {
        k: v
        for k, v in info.record.items()
        if k not in ("sharded", "files", "world_size", "sha256", "format")
    }
    return storage.write_file(state, out, {**record, "consolidated_from": os.fspath(path)})
