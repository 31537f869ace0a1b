"""Finding the checkpoints of a directory, newest first, and the newest intact one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hooktrain_checkpoint import storage

__all__ = ["list_checkpoints", "newest_checkpoint"]


def list_checkpoints(
    directory: str | os.PathLike[str], report: Callable[[str], None] | None = None
) -> list[storage.CheckpointInfo]:
    """Every checkpoint with a readable record in ``directory``, newest (most
    recently saved, `storage.CheckpointInfo.recency_key`) first.

    Sharded checkpoints (directories) are read from their ``state.ckpt``. Files
    whose record is missing or unreadable are passed to ``report`` by name.
    Records are read, data is not verified.
    """
    found = []
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*" + storage.SUFFIX)):
        if path.name.startswith("."):
            continue
        try:
            found.append(storage.read_info(path))
        except storage.DamagedCheckpointError as exc:
            if report is not None:
                report(f"hooktrain-checkpoint: skipping {str(exc.path)!r}, damaged: {exc.reason}")
        except OSError as exc:
            if report is not None:
                report(f"hooktrain-checkpoint: skipping {path}: {exc}")
    # Most recently saved first; between the two files of one save (last.ckpt and
    # the ranked file it links to) prefer last.ckpt.
    found.sort(key=lambda i: (i.recency_key, i.path.stem == storage.LAST_NAME), reverse=True)
    return found


def newest_checkpoint(
    directory: str | os.PathLike[str],
    report: Callable[[str], None] | None = None,
    load_sharded: Callable[[Path], tuple[dict[str, Any], storage.CheckpointInfo]] | None = None,
) -> tuple[dict[str, Any], storage.CheckpointInfo] | None:
    """Load the newest complete, intact checkpoint of ``directory``, of either kind:
    a single file, or a sharded checkpoint's directory, read with ``load_sharded``
    (without it, sharded checkpoints are passed over).

    A damaged file (truncated, or its digest does not match) is passed to
    ``report`` by name and the next newest is tried. A file that safe loading
    refuses stops the search with :class:`~hooktrain_checkpoint.storage.UnsafeCheckpointError`:
    a planted file is not something to step around quietly.

    :return: ``(checkpoint, info)``, or ``None`` when no intact checkpoint exists.
    """
    for info in list_checkpoints(directory, report):
        try:
            if info.path.is_dir():
                if load_sharded is None:
                    continue
                checkpoint, _ = load_sharded(info.path)
            else:
                checkpoint, _ = storage.load_file(info.path, require_record=True)
        except storage.DamagedCheckpointError as exc:
            if report is not None:
                report(
                    f"hooktrain-checkpoint: skipping {str(exc.path)!r}, damaged: {exc.reason}; "
                    f"trying an older one"
                )
            continue
        return checkpoint, info
    return None
