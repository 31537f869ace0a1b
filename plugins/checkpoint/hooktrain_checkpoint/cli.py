"""``hooktrain checkpoint PATH``: what a checkpoint holds, without training.

PATH is a file, or a directory (every checkpoint in it, newest first, and which one
``ckpt_path="last"`` would resume from).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hooktrain.errors import ConfigurationError
from hooktrain_checkpoint import sharded, storage
from hooktrain_checkpoint.discovery import list_checkpoints

__all__ = ["describe", "main"]


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify and read one checkpoint file.

    :return: ``path``, ``status`` (``"ok"``, ``"unverified"`` for a file with no
        integrity record, ``"damaged"``, ``"unsafe"``, or ``"not_a_checkpoint"``
        for a readable file that holds something else, such as a bare
        ``state_dict``), ``error`` when not
        loadable, and otherwise ``epoch``, ``global_step``, ``epoch_batches_done``,
        ``epoch_complete``, ``metrics``, ``plugins``, ``plugin_versions``,
        ``hooktrain_version``, ``optimizers``, ``lr_schedulers``, ``parameters``
        (tensor count and elements), ``saved_at`` and ``size``.
    """
    path = Path(path)
    result: dict[str, Any] = {"path": os.fspath(path)}
    if path.is_dir():
        return _describe_sharded(path, result)
    try:
        result["size"] = path.stat().st_size
        checkpoint, info = storage.load_file(path)
    except Exception as exc:
        return {**result, **_unreadable(exc)}
    model = checkpoint.get("model", {})
    tensors = [v for v in model.values() if hasattr(v, "numel")]
    parameters = {"tensors": len(tensors), "elements": sum(int(t.numel()) for t in tensors)}
    _fill(result, checkpoint, info, parameters)
    return result


def _unreadable(exc: Exception) -> dict[str, str]:
    """The status and error of a checkpoint that could not be read: ``unsafe`` when
    loading it would run code, ``not_a_checkpoint`` when it loaded but holds
    something else, else ``damaged``."""
    if isinstance(exc, storage.UnsafeCheckpointError):
        return {"status": "unsafe", "error": str(exc)}
    if isinstance(exc, storage.DamagedCheckpointError):
        return {"status": "damaged", "error": str(exc)}
    if isinstance(exc, ConfigurationError):
        # Read intact (a bare state_dict, another trainer's file): nothing is damaged.
        return {"status": "not_a_checkpoint", "error": str(exc)}
    return {"status": "damaged", "error": f"{type(exc).__name__}: {exc}"}


def _describe_sharded(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """`describe` for a sharded checkpoint's directory: every file verified, the
    model's size read from DCP's metadata (no tensor is loaded)."""
    try:
        result["size"] = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        checkpoint, info = sharded.verify(path)
        shapes = sharded.tensor_shapes(path)
    except Exception as exc:
        return {**result, **_unreadable(exc)}
    model = [shape for name, shape in shapes.items() if name.startswith("model.")]
    parameters = {"tensors": len(model), "elements": sum(math.prod(s) for s in model)}
    _fill(result, checkpoint, info, parameters)
    result.update(sharded=True, world_size=int(info.record.get("world_size", 0)))
    return result


def _fill(
    result: dict[str, Any],
    checkpoint: dict[str, Any],
    info: storage.CheckpointInfo | None,
    parameters: dict[str, int],
) -> None:
    progress = checkpoint.get("progress", {})
    result.update(
        status="ok" if info is not None else "unverified",
        epoch=int(progress.get("epoch", 0)),
        global_step=int(progress.get("global_step", 0)),
        epoch_batches_done=int(progress.get("epoch_batches_done", 0)),
        epoch_complete=bool(progress.get("epoch_complete", False)),
        metrics={k: float(v) for k, v in checkpoint.get("metrics", {}).items()},
        plugins=list(checkpoint.get("plugin_list", [])),
        plugin_versions=dict(checkpoint.get("plugin_versions", {})),
        plugin_states=sorted(checkpoint.get("plugins", {})),
        hooktrain_version=checkpoint.get("hooktrain_version"),
        optimizers=len(checkpoint.get("optimizers", [])),
        lr_schedulers=len(checkpoint.get("lr_schedulers", [])),
        parameters=parameters,
        saved_at=info.record.get("saved_at") if info is not None else None,
    )


def _print_one(entry: dict[str, Any]) -> None:
    print(f"{entry['path']}")
    print(f"  integrity:   {_integrity(entry['status'])}")
    if "error" in entry:
        print(f"  error:       {entry['error']}")
        return
    position = (
        "epoch complete"
        if entry["epoch_complete"]
        else f"{entry['epoch_batches_done']} batches of the epoch done"
    )
    print(f"  epoch:       {entry['epoch']} ({position})")
    print(f"  global step: {entry['global_step']}")
    if entry.get("saved_at"):
        print(f"  saved at:    {entry['saved_at']}")
    print(f"  size:        {entry['size']:,} bytes")
    if entry.get("sharded"):
        print(f"  sharded:     written by {entry['world_size']} processes (DCP)")
    params = entry["parameters"]
    print(f"  model:       {params['tensors']} tensors, {params['elements']:,} elements")
    print(f"  optimizers:  {entry['optimizers']}, LR schedulers: {entry['lr_schedulers']}")
    print(f"  hooktrain:   {entry['hooktrain_version']}")
    versions = entry["plugin_versions"]
    plugins = ", ".join(
        f"{name} {versions[name]}" if name in versions else name for name in entry["plugins"]
    )
    print(f"  plugins:     {plugins or 'none'}")
    print(f"  plugin state: {', '.join(entry['plugin_states']) or 'none'}")
    if entry["metrics"]:
        print("  metrics:")
        width = max(len(name) for name in entry["metrics"])
        for name, value in sorted(entry["metrics"].items()):
            print(f"    {name:<{width}}  {value:.6g}")


def _integrity(status: str) -> str:
    return {
        "ok": "ok (SHA-256 verified)",
        "unverified": "unverified (no integrity record: not written by hooktrain-checkpoint)",
        "damaged": "DAMAGED",
        "unsafe": "UNSAFE (refused by weights_only loading)",
        "not_a_checkpoint": "not a hooktrain checkpoint (read intact)",
    }[status]


def main(argv: Sequence[str]) -> int:
    """Entry point of ``hooktrain checkpoint``.

    :return: 0 when every checkpoint shown is intact, 1 when one is damaged,
        unsafe or not a hooktrain checkpoint (or a directory holds none), 2 for a
        usage error.
    """
    parser = argparse.ArgumentParser(
        prog="hooktrain checkpoint",
        description="Show what a checkpoint holds (epoch, step, metrics, plugins, versions) "
        "and whether it is intact, without training. Given a directory, show every "
        "checkpoint in it, newest first, and which one ckpt_path='last' resumes from.",
    )
    parser.add_argument("path", help="a .ckpt file or a checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--consolidate",
        metavar="OUT",
        help="write the sharded checkpoint PATH as the single-file checkpoint OUT",
    )
    try:
        options = parser.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    path = Path(options.path)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    one_sharded = (path / storage.STATE_FILE).is_file()
    if options.consolidate:
        return _consolidate(path, Path(options.consolidate), one_sharded)
    if path.is_dir() and not one_sharded:
        damaged: list[str] = []
        files = [info.path for info in list_checkpoints(path, report=damaged.append)]
        # Files without a record are shown too: the user asked about this directory.
        listed = set(files)
        files += [
            p
            for p in sorted(path.glob("*" + storage.SUFFIX))
            if p not in listed and not p.name.startswith(".")
        ]
        entries = [describe(p) for p in files]
        # "last" steps over damaged files but stops at an unsafe one (resume.load).
        first = next((e for e in entries if e["status"] in ("ok", "unsafe")), None)
        resume = first["path"] if first and first["status"] == "ok" else None
        refused = first["path"] if first and first["status"] == "unsafe" else None
    else:
        entries = [describe(path)]
        resume = refused = None
    if options.json:
        listing = path.is_dir() and not one_sharded
        payload: Any = (
            {"checkpoints": entries, "resumes_from": resume, "refuses": refused}
            if listing
            else entries[0]
        )
        print(json.dumps(payload, indent=2))
    else:
        if path.is_dir() and not one_sharded:
            if not entries:
                print(f"{path}: no checkpoints")
            elif refused:
                print(f"ckpt_path='last' refuses to resume: {refused} is unsafe (below)\n")
            else:
                print(f"ckpt_path='last' resumes from: {resume or 'nothing (starts fresh)'}\n")
        for entry in entries:
            _print_one(entry)
    bad = any(e["status"] in ("damaged", "unsafe", "not_a_checkpoint") for e in entries)
    return 1 if bad or not entries else 0


def _consolidate(path: Path, out: Path, one_sharded: bool) -> int:
    if not one_sharded:
        print(
            f"error: {path} is not a sharded checkpoint (no {storage.STATE_FILE})", file=sys.stderr
        )
        return 2
    try:
        size = sharded.consolidate(path, out)
    except (storage.DamagedCheckpointError, storage.UnsafeCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({size:,} bytes) from {path}")
    return 0
