"""TensorBoard event files for hooktrain.

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

The plugin writes the event files itself (:mod:`._event_file`), from the training
thread, at its flush points: no writer thread. Nothing here imports ``tensorboard``
until the plugin is constructed, and only the global-zero process writes.
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
    from hooktrain.trainer import Trainer

    from ._event_file import EventFile

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
    :param max_queue: events kept in memory before a write is forced.
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
            # pays for TensorBoard's protocol buffers (about 15 ms; the writer
            # of torch.utils.tensorboard, not used, took about 0.18 s).
            from . import _event_file
        except ImportError as exc:
            raise ImportError(
                "the hooktrain 'tensorboard' plugin needs the 'tensorboard' package: "
                "pip install tensorboard"
            ) from exc
        self._event_file_cls = _event_file.EventFile
        self.log_dir = Path(log_dir)
        self.run_name = name
        self.version = version
        self.log_every_n_steps = log_every_n_steps
        self.log_lr = log_lr
        self.log_hparams = log_hparams
        self.extra_hparams = dict(hparams or {})
        self.flush_secs = flush_secs
        self.max_queue = max_queue

        # Events wait in the file object's memory until a flush point.
        self._file: EventFile | None = None
        self._flushed_at = 0.0
        #: The version folder this run writes to, once chosen (kept across stages).
        self.run_dir: Path | None = None
        self._resume_dir: str | None = None
        self._purge_step: int | None = None
        self._lr_step = -1
        # The tag of each published name, per scope.
        self._tags: dict[str, dict[str, str]] = {}

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
        """Open the event file on the global-zero process; ``False`` elsewhere."""
        if self._file is not None:
            return True
        if not trainer.is_global_zero:
            return False
        if self.run_dir is None:
            self.run_dir = self._choose_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._resume_dir is not None and self._purge_step is not None:
            _wait_for_a_later_file_name(self.run_dir)
        # The restart marker (purge step) leads the new file.
        self._file = self._event_file_cls(self.run_dir, purge_step=self._purge_step)
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
        tags = self._tags.get(scope)
        if tags is None:
            tags = self._tags[scope] = {}
        values = []
        for name, value in metrics.items():
            tag = tags.get(name)
            if tag is None:
                tag = tags[name] = _tag(scope, name)
            values.append((tag, float(value)))
        if self.log_lr and scope in ("step", "epoch") and step != self._lr_step:
            self._lr_step = step
            values.extend(_lrs(trainer))
        file = self._file
        if values:
            # Kept as plain values with the wall time of the moment of logging;
            # made into an event at the next write.
            file.add_scalars(time.time(), step, values)
        # A write is one system call; at most one epoch-end write a second keeps a
        # run of many tiny epochs from paying one per epoch.
        since = time.monotonic() - self._flushed_at
        if (
            since >= self.flush_secs
            or (scope == "epoch" and since >= _EPOCH_FLUSH_MIN_S)
            or file.pending >= self.max_queue
        ):
            self._flush()

    @hookimpl
    def on_exception(self) -> None:
        self._flush()

    @hookimpl
    def teardown(self) -> None:
        """Write what is pending and close the file; a later stage of the same
        trainer opens a new file in the same version folder."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def _flush(self) -> None:
        """Write everything pending to disk now."""
        if self._file is not None:
            self._file.write()
            self._flushed_at = time.monotonic()

    # ------------------------------------------------------------------ helpers

    def _registered_name(self, trainer: Trainer) -> str:
        return trainer.plugin_manager.get_name(self) or self.name

    def _write_hparams(self, trainer: Trainer) -> None:
        params = {key: _hparam_value(value) for key, value in trainer.hparams.items()}
        params.update({key: _hparam_value(value) for key, value in self.extra_hparams.items()})
        wall_time = time.time()
        for event in _hparams_events(params, trainer.global_step, wall_time):
            self._file.add(event)


def _hparams_events(
    params: Mapping[str, bool | int | float | str], step: int, wall_time: float
) -> list[Any]:
    """The three events of TensorBoard's hparams plugin: the experiment (which
    hyperparameters exist), the session's start (their values) and its end."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    experiment = api_pb2.Experiment()
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in params.items():
        # Booleans are numbers here (0 and 1), as torch.utils.tensorboard writes them.
        if isinstance(value, str):
            start.hparams[key].string_value = value
            kind = api_pb2.DATA_TYPE_STRING
        else:
            start.hparams[key].number_value = value
            kind = api_pb2.DATA_TYPE_FLOAT64
        experiment.hparam_infos.add(name=key, type=kind)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    events = []
    for tag, data in (
        ("_hparams_/experiment", plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (
            "_hparams_/session_start_info",
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
        ("_hparams_/session_end_info", plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ):
        metadata = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(
                plugin_name="hparams", content=data.SerializeToString()
            )
        )
        summary = Summary(value=[Summary.Value(tag=tag, metadata=metadata)])
        events.append(Event(wall_time=wall_time, step=step, summary=summary))
    return events


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


def _tag(scope: str, name: str) -> str:
    """``val_acc`` published after a validation is written as ``val/acc``."""
    prefix = _SCOPE_PREFIX.get(scope, "")
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return f"{_SCOPE_TAG.get(scope, scope)}/{name}"


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
