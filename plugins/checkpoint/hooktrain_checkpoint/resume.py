"""Resuming: which checkpoint ``ckpt_path`` names, and what differs since it was saved."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError, warn_user
from hooktrain_checkpoint import sharded, storage
from hooktrain_checkpoint.discovery import list_checkpoints, newest_checkpoint

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = [
    "check_processes_agree",
    "load",
    "progress",
    "report_differences",
    "restore_ranking",
    "saved_progress",
]


def load(
    ckpt_path: str, dirpath: Path, *, say: bool, trainer: Trainer
) -> tuple[Mapping[str, Any], str] | None:
    """The checkpoint that ``ckpt_path`` names, and the file it came from.

    ``"last"`` means the newest intact checkpoint of ``dirpath``, a directory its
    newest intact one (damaged files are reported and stepped over), a sharded
    checkpoint's directory that checkpoint; anything else is a file, loaded as it
    is. Sharded checkpoints are read into the form of ``trainer``'s model and
    optimizers (every process must call this). With ``say``, what happens is
    printed to stderr.

    :return: ``None`` when a directory holds no intact checkpoint.
    :raises storage.DamagedCheckpointError: when the file named is damaged.
    :raises storage.UnsafeCheckpointError: when safe loading refuses a file.
    """
    path = Path(ckpt_path)

    def load_sharded(where: Path) -> tuple[dict[str, Any], storage.CheckpointInfo]:
        return sharded.load(trainer, where)

    if ckpt_path != storage.LAST_NAME and (path / sharded.STATE_FILE).is_file():
        checkpoint, _ = load_sharded(path)
        loaded_from = os.fspath(path)
    elif ckpt_path == storage.LAST_NAME or path.is_dir():
        directory = dirpath if ckpt_path == storage.LAST_NAME else path
        found = newest_checkpoint(
            directory, report=_stderr if say else None, load_sharded=load_sharded
        )
        if found is None:
            if say:
                print(
                    f"hooktrain-checkpoint: no complete checkpoint in {directory}; starting fresh",
                    file=sys.stderr,
                )
            return None
        checkpoint, info = found
        loaded_from = os.fspath(info.path)
    else:
        checkpoint, info = storage.load_file(path)
        loaded_from = os.fspath(path)
        if info is None and say:
            print(
                f"hooktrain-checkpoint: {path} has no integrity record (not written by "
                f"this plugin); loaded without verification",
                file=sys.stderr,
            )
    if say:
        progress = checkpoint["progress"]
        print(
            f"hooktrain-checkpoint: resuming from {loaded_from} (epoch "
            f"{progress['epoch']}, global step {progress['global_step']})",
            file=sys.stderr,
        )
    return checkpoint, loaded_from


def check_processes_agree(trainer: Trainer, ckpt_path: str, dirpath: Path) -> None:
    """On several processes, check that each sees the same thing where ``ckpt_path``
    points (``"last"``: ``dirpath``), before any of them loads it: the same
    checkpoint names there (or the same file size).

    A process that resolved another checkpoint, or none (a ``dirpath`` per rank,
    node-local storage), would train from other weights, or wait in a collective
    the others never enter: a sharded load hung for the whole timeout, silently.

    :raises ConfigurationError: on every process, with what each one sees.
    """
    if trainer.world_size == 1:
        return
    from hooktrain.running_means import process_collectives

    where = dirpath if ckpt_path == storage.LAST_NAME else Path(ckpt_path)
    if where.is_dir():
        seen = ", ".join(sorted(p.name for p in where.glob("*" + storage.SUFFIX))) or "nothing"
    else:
        seen = f"a file of {where.stat().st_size} bytes" if where.is_file() else "nothing"
    views = process_collectives(trainer).all_gather_object((os.fspath(where), seen))
    # Paths may differ (one file system mounted in two places): what is there may not.
    if all(what == views[0][1] for _, what in views):
        return
    each = "; ".join(f"rank {rank}: {path} holds {what}" for rank, (path, what) in enumerate(views))
    raise ConfigurationError(
        f"hooktrain-checkpoint: the processes see different checkpoints for "
        f"ckpt_path={ckpt_path!r} ({each}). Every process resumes from the same "
        f"checkpoint: give them one dirpath on storage they all read (the plugin saves "
        f"every process's shards into rank 0's)"
    )


def report_differences(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Print to stderr the plugins selected now that the checkpoint has no state for
    (those that would load some: they implement ``on_load_checkpoint``), and the
    versions (hooktrain's, plugins') that changed since it was saved."""
    saved_plugins = list(checkpoint.get("plugin_list", []))
    fresh = [
        name
        for name in trainer.plugin_names
        if name not in saved_plugins
        and name not in checkpoint.get("plugins", {})
        and hasattr(trainer.plugin_manager.get_plugin(name), "on_load_checkpoint")
    ]
    if fresh:
        print(
            f"hooktrain-checkpoint: plugins selected now but not in the checkpoint start "
            f"without saved state: {', '.join(fresh)}",
            file=sys.stderr,
        )
    from hooktrain import __version__
    from hooktrain.plugins import installed_plugins

    changed = []
    if checkpoint.get("hooktrain_version") not in (None, __version__):
        changed.append(f"hooktrain {checkpoint['hooktrain_version']} -> {__version__}")
    installed = installed_plugins()
    for name, version in checkpoint.get("plugin_versions", {}).items():
        now = installed[name].version if name in installed else None
        if now is not None and now != version:
            changed.append(f"{name} {version} -> {now}")
    if changed:
        print(
            f"hooktrain-checkpoint: versions changed since the checkpoint was saved: "
            f"{'; '.join(changed)}",
            file=sys.stderr,
        )


def number_saves_after(directory: Path, sequence: int, fresh: bool) -> int:
    """The save number a fit starts counting from: ``sequence`` (its own, or the
    one its checkpoint restored), or the highest in ``directory`` if higher, so
    that "last" finds this fit's saves newest: a fresh run's after a longer earlier
    run's, a resume from an older file's after the files it branched from. A
    ``fresh`` fit (one that resumed nothing) is warned by `warn_if_starting_over`."""
    earlier = list_checkpoints(directory)
    if fresh:
        warn_if_starting_over(directory, earlier)
    return max([sequence, *(int(info.record.get("sequence", 0)) for info in earlier)])


def warn_if_starting_over(directory: Path, earlier: list[storage.CheckpointInfo]) -> None:
    """At the start of a fit that resumed nothing: warn when ``directory`` holds
    checkpoints already (``earlier``, newest first), since this run's saves replace
    ``last.ckpt`` (and any ranked file of the same name), and ``"last"`` would then
    resume this run."""
    if earlier:
        warn_user(
            f"hooktrain-checkpoint: {directory} holds {len(earlier)} checkpoint(s) already "
            f"(newest: {Path(earlier[0].path).name}) and this fit starts fresh: its saves "
            f"replace last.ckpt and any file of the same name. Pass ckpt_path='last' to "
            f"continue that run, or give this one another dirpath"
        )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def restore_ranking(
    state: Mapping[str, Any], dirpath: Path, *, monitor: str | None, mode: str, remove: bool
) -> tuple[dict[str, float], dict[str, int]] | None:
    """The ranking that a checkpoint's plugin ``state`` holds: the kept files still
    in ``dirpath`` (files removed since, by hand or by a later run, are forgotten)
    with their scores, and their global steps; ``None`` when the state was ranked
    by another ``monitor`` or ``mode`` than this run's.

    A save evicts files only once its own files are complete, after the checkpoint
    that no longer lists them was written; a run killed in between left them for
    good. With ``remove`` (the process that writes) they are deleted now, when
    ``dirpath`` is where that run saved; that process also says on stderr when a
    changed ranking leaves the checkpoint's kept files unranked.
    """
    best: dict[str, float] = {}
    kept = state.get("best_k_models", {})
    same_ranking = state.get("monitor") == monitor and state.get("mode") == mode
    if same_ranking:
        best = {name: float(score) for name, score in kept.items() if (dirpath / name).exists()}
    elif kept and remove:
        # They stay on disk: their scores are of another metric, or another order.
        print(
            f"hooktrain-checkpoint: the checkpoint ranked by {state.get('monitor')!r} "
            f"({state.get('mode')}), this run by {monitor!r} ({mode}): the {len(kept)} "
            f"file(s) it kept ({', '.join(sorted(kept))}) stay on disk, unranked; this "
            f"run never removes them",
            file=sys.stderr,
        )
    # Absent from checkpoints saved before it was kept: then none is replaced.
    steps = {name: int(step) for name, step in state.get("kept_steps", {}).items() if name in best}
    if remove and state.get("dirpath") == str(dirpath):
        for name in state.get("evicting", []):
            if name not in best:
                sharded.remove(dirpath / name)
    return (best, steps) if same_ranking else None


def progress(trainer: Trainer) -> tuple[int, int, int, bool]:
    """Where the run stands: ``(epoch, global step, batches done in the epoch,
    whether the epoch is complete)``. Equal to a checkpoint's `saved_progress`
    when that checkpoint holds this very state, so that it is not saved twice."""
    return (
        trainer.current_epoch,
        trainer.global_step,
        trainer.epoch_batches_done,
        trainer.epoch_complete,
    )


def saved_progress(checkpoint: Mapping[str, Any]) -> tuple[int, int, int, bool]:
    """`progress` as ``checkpoint`` recorded it."""
    saved = checkpoint["progress"]
    return (
        int(saved["epoch"]),
        int(saved["global_step"]),
        int(saved["epoch_batches_done"]),
        bool(saved["epoch_complete"]),
    )
