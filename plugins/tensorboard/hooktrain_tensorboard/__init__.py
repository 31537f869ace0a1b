"""TensorBoard event files for hooktrain, written with ``torch.utils.tensorboard``.

Each run writes to ``<log_dir>/<name>/version_<n>``: a fresh run takes the next
free ``n``; a run resumed from a checkpoint goes on writing in the version it
started in, and tells TensorBoard to drop whatever that version holds past the
checkpoint's step (events written after the checkpoint and before a crash), so no
step appears twice.

What is written, all against ``trainer.global_step``:

* ``train/<name>``: the values the trainer publishes every ``log_every_n_steps``
  (``loss`` and everything passed to ``trainer.log``), optionally thinned out;
* ``epoch/<name>``: the epoch means (``loss``, metrics, logged values);
* ``val/<name>`` and ``test/<name>``: validation and test means (``val_loss`` is
  written as ``val/loss``);
* ``lr/group_<g>`` (``lr/optimizer_<k>/group_<g>`` with several optimizers): the
  learning rate of every parameter group, whenever train or epoch values are;
* the run's hyperparameters (the trainer's settings, the plugin list, and any
  ``hparams`` given here), in the HPARAMS tab of the same run.

Nothing here imports ``tensorboard`` until the plugin is constructed, and only
the global-zero process writes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from hooktrain.trainer import Trainer

__all__ = ["TensorBoardLogger"]
__version__ = "0.1.0"

_VERSION_DIR = re.compile(r"^version_(\d+)$")
_EPOCH_FLUSH_MIN_S = 1.0
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
_SCOPE_TAG = {"step": "train", "epoch": "epoch", "validate": "val", "test": "test"}
_SCOPE_PREFIX = {"validate": "val_", "test": "test_"}


class TensorBoardLogger:
    """A hooktrain plugin writing TensorBoard event files (entry-point name
    ``tensorboard``).

    :param log_dir: the root folder of all runs.
    :param name: the experiment's folder under ``log_dir``; ``""`` puts the
        versions right under ``log_dir``.
    :param version: write into ``version_<version>`` (an int) or into a folder of
        this name (a string) instead of the next free version.
    :param log_every_n_steps: write the published training values only at steps
        that are a multiple of this (use a multiple of the trainer's
        ``log_every_n_steps``); default: every time the trainer publishes.
    :param log_lr: write the learning rate of each optimizer parameter group.
    :param log_hparams: write the run's hyperparameters when a fresh fit starts.
    :param hparams: more hyperparameters to record with the trainer's settings
        (numbers, strings, booleans; anything else is recorded as its ``str``).
    :param flush_secs: events are kept in memory and written to disk at least
        this often (checked whenever values are published), at the end of each
        epoch (at most once a second), when an exception is raised, and at
        teardown: a process killed outright loses at most this many seconds.
    :param max_queue: events the writer thread may hold before a write is forced.
    """

    #: Registered under this name when passed as an object (the run's own name is
    #: the ``name`` argument, kept in :attr:`run_name`).
    name = "tensorboard"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "runs",
        *,
        name: str = "default",
        version: int | str | None = None,
        log_every_n_steps: int | None = None,
        log_lr: bool = True,
        log_hparams: bool = True,
        hparams: Mapping[str, Any] | None = None,
        flush_secs: float = 5.0,
        max_queue: int = 1000,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}"
            )
        if not flush_secs > 0:
            raise ValueError(f"flush_secs must be > 0, got {flush_secs!r}")
        try:
            # Imported here, not at module level: selecting the plugin is what
            # pays for TensorBoard (about a quarter of a second).
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "the hooktrain 'tensorboard' plugin needs the 'tensorboard' package: "
                "pip install tensorboard"
            ) from exc
        self._summary_cls = Summary
        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self.run_name = name
        self.version = version
        self.log_every_n_steps = log_every_n_steps
        self.log_lr = log_lr
        self.log_hparams = log_hparams
        self.extra_hparams = dict(hparams or {})
        self.flush_secs = flush_secs
        self.max_queue = max_queue

        self._writer: SummaryWriter | None = None
        self._file_writer: Any = None
        # Summaries wait here, with their step and wall time, until a flush point:
        # every event handed to the writer wakes its thread, which then competes
        # with the training loop for the GIL, so they are handed over in batches.
        self._pending: list[tuple[Any, int, float]] = []
        self._flushed_at = 0.0
        #: The version folder this run writes to, once chosen (kept across stages).
        self.run_dir: Path | None = None
        self._resume_dir: str | None = None
        self._purge_step: int | None = None
        self._lr_step = -1

    # ------------------------------------------------------------------ the run folder

    def _experiment_dir(self) -> Path:
        return self.log_dir / self.run_name if self.run_name else self.log_dir

    def _choose_run_dir(self) -> Path:
        root = self._experiment_dir()
        if self._resume_dir is not None:
            return root / self._resume_dir
        if self.version is not None:
            folder = f"version_{self.version}" if isinstance(self.version, int) else self.version
            return root / folder
        root.mkdir(parents=True, exist_ok=True)
        taken = [
            int(match.group(1))
            for entry in os.listdir(root)
            if (match := _VERSION_DIR.match(entry)) and (root / entry).is_dir()
        ]
        number = max(taken, default=-1) + 1
        while True:
            # Claim the folder atomically: two runs started together get two versions.
            candidate = root / f"version_{number}"
            try:
                candidate.mkdir()
            except FileExistsError:
                number += 1
                continue
            return candidate

    def _open(self, trainer: Trainer) -> bool:
        """Open the writer on the global-zero process; ``False`` elsewhere."""
        if self._writer is not None:
            return True
        if not trainer.is_global_zero:
            return False
        if self.run_dir is None:
            self.run_dir = self._choose_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._resume_dir is not None and self._purge_step is not None:
            _wait_for_a_later_file_name(self.run_dir)
        self._writer = self._writer_cls(
            log_dir=str(self.run_dir),
            purge_step=self._purge_step,
            max_queue=self.max_queue,
            flush_secs=self.flush_secs,
        )
        # Built now so that the purge marker (on resume) leads the new file.
        self._file_writer = self._writer._get_file_writer()
        self._flushed_at = time.monotonic()
        self._purge_step = None
        return True

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        """Resume in the version folder the checkpoint's run wrote to, and mark
        every step after the checkpoint's as stale."""
        own = checkpoint.get("plugins", {}).get(self._registered_name(trainer))
        if isinstance(own, Mapping) and own.get("version"):
            self._resume_dir = str(own["version"])
            self.run_dir = None
        # Events the old run wrote after the checkpoint (before it crashed or was
        # stopped) are replaced by this run's: TensorBoard drops steps >= this one
        # that precede the marker.
        self._purge_step = trainer.global_step + 1

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        if self.run_dir is not None:
            checkpoint.setdefault("plugins", {})[self._registered_name(trainer)] = {
                "version": self.run_dir.name,
                "run_name": self.run_name,
                "global_step": trainer.global_step,
            }

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        resumed = self._purge_step is not None
        if not resumed:
            # Every fit's file starts with a session-start marker. TensorBoard's
            # server ignores the first marker of a run and purges on later ones,
            # so the fresh run's marker is what makes a resume's marker count.
            self._purge_step = trainer.global_step
        if self._open(trainer) and self.log_hparams and not resumed:
            self._write_hparams(trainer)

    @hookimpl
    def log_metrics(
        self, trainer: Trainer, metrics: Mapping[str, float], step: int, scope: str
    ) -> None:
        """Write what the trainer published: the values are floats already, so this
        costs no device sync (a learning rate stored as a tensor is read here)."""
        every = self.log_every_n_steps
        if scope == "step" and every is not None and step % every:
            return
        if not self._open(trainer):
            return
        group = _SCOPE_TAG.get(scope, scope)
        prefix = _SCOPE_PREFIX.get(scope, "")
        value_cls = self._summary_cls.Value
        values = [
            value_cls(tag=f"{group}/{_strip(name, prefix)}", simple_value=float(value))
            for name, value in metrics.items()
        ]
        if self.log_lr and scope in ("step", "epoch") and step != self._lr_step:
            self._lr_step = step
            values.extend(value_cls(tag=tag, simple_value=lr) for tag, lr in _lrs(trainer))
        if values:
            self._add(self._summary_cls(value=values), step)
        # Writing waits for TensorBoard's writer thread; in a run of many short
        # epochs that wait would cost more than the training, hence at most one
        # epoch-end write per second.
        since = time.monotonic() - self._flushed_at
        if since >= self.flush_secs or (scope == "epoch" and since >= _EPOCH_FLUSH_MIN_S):
            self._flush()

    @hookimpl
    def on_exception(self) -> None:
        self._flush()

    @hookimpl
    def teardown(self) -> None:
        """Flush and close the writer; a later stage of the same trainer reopens
        the same version folder."""
        if self._writer is not None:
            self._hand_over()
            self._writer.close()
            self._writer = None
            self._file_writer = None

    # ------------------------------------------------------------------ buffering

    def _add(self, summary: Any, step: int) -> None:
        # The wall time of the moment of logging, not of the later write.
        self._pending.append((summary, step, time.time()))

    def _hand_over(self) -> None:
        """Queue the pending summaries on the writer (its thread writes them)."""
        pending, self._pending = self._pending, []
        if self._file_writer is not None:
            for summary, step, wall_time in pending:
                self._file_writer.add_summary(summary, step, wall_time)

    def _flush(self) -> None:
        """Write everything pending to disk now."""
        if self._writer is not None:
            self._hand_over()
            self._writer.flush()
            self._flushed_at = time.monotonic()

    # ------------------------------------------------------------------ helpers

    def _registered_name(self, trainer: Trainer) -> str:
        return trainer.plugin_manager.get_name(self) or self.name

    def _write_hparams(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {key: _hparam_value(value) for key, value in trainer.hparams.items()}
        params.update({key: _hparam_value(value) for key, value in self.extra_hparams.items()})
        experiment, session_start, session_end = hparams(params, {})
        for summary in (experiment, session_start, session_end):
            self._add(summary, trainer.global_step)


def _wait_for_a_later_file_name(run_dir: Path) -> None:
    """TensorBoard reads a run's files in name order, and a name starts with the
    second it was created in, then the host, process id and a per-process counter,
    which do not sort by time. A resumed run's restart marker must be read after
    the old events, so its file must be created in a later second than theirs."""
    newest = max(
        (int(m.group(1)) for entry in os.listdir(run_dir) if (m := _EVENT_FILE.match(entry))),
        default=None,
    )
    if newest is not None:
        delay = newest + 1 - time.time()
        if delay > 0:
            time.sleep(min(delay, 1.0))


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _lrs(trainer: Trainer) -> list[tuple[str, float]]:
    optimizers = trainer.optimizers
    several = len(optimizers) > 1
    found = []
    for k, optimizer in enumerate(optimizers):
        for g, param_group in enumerate(optimizer.param_groups):
            lr = param_group.get("lr")
            if lr is None:
                continue
            tag = f"lr/optimizer_{k}/group_{g}" if several else f"lr/group_{g}"
            found.append((tag, float(lr)))
    return found


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)
