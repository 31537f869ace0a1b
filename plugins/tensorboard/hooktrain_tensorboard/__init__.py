"""TensorBoard event files for hooktrain, written by ``torch.utils.tensorboard``.

A small logger plugin, meant to be copied by anyone writing another one: options
checked when it is constructed, the heavy library imported only when the first
file is opened on the global-zero process, versioned run folders, hyperparameters,
and resuming without writing a step twice.

Each fit writes to ``<log_dir>/<name>/version_<n>``:

* a fit that does not resume from a checkpoint takes the next free ``n``, also a
  later fit of the same trainer (which counts its steps from 0 again);
* a fit resumed from a checkpoint goes on writing in the version the checkpoint
  records, and marks a restart at the checkpoint's step + 1: TensorBoard then drops
  what that version holds past the checkpoint (steps trained before a crash). What
  the files hold at the checkpoint's step itself (an epoch's end that ran after a
  step-wise checkpoint of its last batch, and runs again when resumed) is read
  back and not written again, so no step appears twice;
* ``validate`` and ``test`` write into the latest fit's version.

Against ``trainer.global_step`` it writes ``train/<name>`` (what the trainer
publishes every ``log_every_n_steps``), ``epoch/<name>`` (epoch means), ``val/<name>``
and ``test/<name>``, ``lr/group_<g>`` and the run's hyperparameters; the tags are
listed in docs/plugins/tensorboard.md.

``SummaryWriter`` writes the files. The values the trainer publishes wait in a list
until a flush point (an epoch's end, ``flush_secs``, ``max_queue``, a checkpoint,
an exception, teardown: `hooktrain.loggers.FlushSchedule`), where they are handed
to the writer at once and the plugin waits until they are in the file: the
writer's thread wakes once per flush point instead of at every publication.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain.loggers import (
    FlushSchedule,
    LoggedSteps,
    check_flags_and_hparams,
    check_version,
    collect_hparams,
    experiment_dir,
    hparam_value,
    load_state,
    save_state,
    version_dir,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from hooktrain.trainer import Trainer

__all__ = ["TensorBoardLogger"]
__version__ = "0.1.0"

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
        this name (a string) instead of the next free version. Every fit that does
        not resume then writes there, and its restart marker makes TensorBoard show
        that fit in place of what the folder held.
    :param log_every_n_steps: write the published training values only at steps
        that are a multiple of this (use a multiple of the trainer's
        ``log_every_n_steps``); default: every time the trainer publishes.
    :param log_lr: write the learning rate of each optimizer parameter group.
    :param log_hparams: write the run's hyperparameters when a fit that does not
        resume starts.
    :param hparams: more hyperparameters to record with the trainer's settings and
        the model's ``hparams`` (numbers, strings, booleans; anything else is
        recorded as its ``str``).
    :param flush_secs: published values are written at least this often, in
        seconds (checked whenever values are published), at the end of each epoch
        (at most once a second), at each checkpoint, when an exception is raised,
        and at teardown: a process killed outright loses what was published since the last of these.
    :param max_queue: publications kept waiting before a write is forced.
    :raises ConfigurationError: (a ``ValueError``) ``log_every_n_steps`` is not an
        integer >= 1, ``flush_secs`` is not > 0, ``max_queue`` is not an integer >= 1,
        or ``version`` is none of ``None``, an integer >= 0 and a non-empty string.
    :raises ImportError: the ``tensorboard`` package is not installed.
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
        if log_every_n_steps is not None and not _positive_int(log_every_n_steps):
            raise ConfigurationError(
                f"tensorboard: log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}"
            )
        self._schedule = FlushSchedule(flush_secs, max_queue, owner="tensorboard")
        check_version(version, "tensorboard")
        check_flags_and_hparams("tensorboard", hparams, log_lr=log_lr, log_hparams=log_hparams)
        # Only looked up here: importing torch.utils.tensorboard takes 0.2 to 0.5 s,
        # paid when the first file is opened, and only on the process that writes.
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "the hooktrain 'tensorboard' plugin needs the 'tensorboard' package: "
                "pip install tensorboard"
            )
        self.log_dir = Path(log_dir)
        self.run_name = name
        self.version = version
        self.log_every_n_steps = log_every_n_steps
        self.log_lr = log_lr
        self.log_hparams = log_hparams
        self.extra_hparams = dict(hparams or {})
        self.flush_secs = flush_secs
        self.max_queue = max_queue

        #: The version folder of the latest fit, once chosen (validate and test
        #: write there too).
        self.run_dir: Path | None = None
        self._writer: SummaryWriter | None = None
        # Waiting for the next flush point: (wall time in seconds, step, a Summary, or
        # the [(tag, value)] of one: made into one there, out of the training loop).
        self._pending: list[tuple[float, int, Any]] = []
        # Set by on_load_checkpoint for the fit that follows: the version folder the
        # checkpoint's run wrote to (None when it does not say), its restart step, and
        # the rates its last step trained with (empty when it did not save them).
        self._resume: tuple[str | None, int, list[list[float]]] | None = None
        # In a resumed fit, the last step each tag already holds in the version's
        # files (up to the checkpoint's step); None otherwise.
        self._logged: LoggedSteps | None = None
        self._lr_step = -1
        # The learning rates a step trains with, read before it (by the time its values
        # are published a scheduler may have moved them), and that step's number.
        self._step_lrs: tuple[int, list[list[float]]] = (-1, [])

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer, batch_idx: int) -> None:
        if not self.log_lr:
            return
        # Only before a step whose values are published, or an epoch's last (for the
        # epoch's values): reading every group of every optimizer before each step
        # cost about 3 us a step (the profile plugin, on the benchmark's MLP).
        total = trainer.num_training_batches
        last = total is None or batch_idx + 1 >= total
        if last or (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            self._step_lrs = (trainer.global_step + 1, _current_lrs(trainer))

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        own = load_state(trainer, self, checkpoint)
        version = str(own["version"]) if own and own.get("version") else None
        # Events the old run wrote after the checkpoint (before it crashed or was
        # stopped) are replaced by this run's: TensorBoard drops the steps >= this
        # one that precede the restart marker.
        # A checkpoint of an epoch's last batch resumes with the epoch's end, whose
        # values are written at that step, with no step run before it to read the
        # rates it trained with (the scheduler has moved them since).
        lrs = (own.get("step_lrs") if own else None) or []
        self._resume = (version, trainer.global_step + 1, lrs)

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        if self.run_dir is not None:
            state = {
                "version": self.run_dir.name,
                "run_name": self.run_name,
                "global_step": trainer.global_step,
            }
            if self._step_lrs[0] == trainer.global_step:
                state["step_lrs"] = self._step_lrs[1]
            save_state(trainer, self, checkpoint, state)
            # What was published before the checkpoint is in the file when the
            # checkpoint is, and the publication right after it goes at once, as
            # with the other loggers of the mould.
            self._flush()
            self._schedule.checkpointed()

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        resume, self._resume = self._resume, None
        # Each fit counts steps from 0 again: the previous fit's last one says nothing.
        self._lr_step = -1
        self._step_lrs = (-1, [])
        if resume is None:
            # A new version even for a later fit of the same trainer: in the same
            # folder, this fit's restart marker would drop the earlier fit's steps.
            self.run_dir = None
            # A fresh fit's file starts with a restart marker too: TensorBoard's
            # Python reader honours a resumed run's marker only when the run's first
            # file had one.
            restart_step = trainer.global_step
        else:
            version, restart_step, lrs = resume
            if lrs:
                self._step_lrs = (restart_step - 1, lrs)
            root = experiment_dir(self.log_dir, self.run_name)
            self.run_dir = root / version if version else None
        self._logged = None
        if resume is not None and self.run_dir is not None and trainer.is_global_zero:
            self._logged = _logged_steps(self.run_dir, before=restart_step)
        if self._open(trainer, restart_step) and self.log_hparams and resume is None:
            self._write_hparams(trainer)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        # Only a fit that ran to its end is a success in the HPARAMS tab; one that
        # raised, was killed or stopped by SIGTERM (and is continued by a resume,
        # which ends it) has no end, which TensorBoard shows as unknown.
        if self.log_hparams and not trainer.interrupted and self._open(trainer):
            from torch.utils.tensorboard.summary import hparams

            _experiment, _start, end = hparams({}, {})
            self._pending.append((time.time(), trainer.global_step, end))

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
        values = [(_tag(scope, name), float(value)) for name, value in metrics.items()]
        if self.log_lr and scope in ("step", "epoch") and step != self._lr_step:
            self._lr_step = step
            read_for, lrs = self._step_lrs
            if read_for != step:
                # Not read before this step: a loader that yielded fewer batches than
                # its len said. Now is the closest (a scheduler may have moved on).
                lrs = _current_lrs(trainer)
            values.extend(_lr_tags(lrs))
        if self._logged is not None and trainer.stage == "fit":
            values = list(self._logged.fresh(dict(values), step).items())
        if values:
            self._pending.append((time.time(), step, values))
        # Each flush wakes the writer thread and waits for it.
        if self._schedule.due(scope, len(self._pending)):
            self._flush()

    @hookimpl
    def on_exception(self) -> None:
        self._flush()

    @hookimpl
    def teardown(self) -> None:
        """Write what is pending and close the file; a later stage of the same
        trainer opens a new file."""
        if self._writer is not None:
            self._flush()
            writer, self._writer = self._writer, None
            writer.close()

    # ------------------------------------------------------------------ helpers

    def _open(self, trainer: Trainer, restart_step: int | None = None) -> bool:
        """Open an event file on the global-zero process; ``False`` elsewhere."""
        if self._writer is not None:
            return True
        if not trainer.is_global_zero:
            return False
        if self.run_dir is None:
            self.run_dir = version_dir(experiment_dir(self.log_dir, self.run_name), self.version)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if restart_step is not None:
            _wait_for_a_later_file_name(self.run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(self.run_dir),
            max_queue=self.max_queue,
            flush_secs=self.flush_secs,
            purge_step=restart_step,
        )
        self._schedule.done()
        return True

    def _flush(self) -> None:
        """Hand the pending values to the writer, one event per publication, and
        wait until it has written them to the file."""
        if self._writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        file_writer = self._writer.file_writer
        pending, self._pending = self._pending, []
        for wall_time, step, summary in pending:
            if isinstance(summary, list):
                summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in summary])
            file_writer.add_summary(summary, step, wall_time)
        self._writer.flush()
        self._schedule.done()

    def _write_hparams(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = collect_hparams(trainer, self.extra_hparams)
        # SummaryWriter.add_hparams would put them in a run of their own; written to
        # this run's file, the HPARAMS tab links them to this run's scalars. torch
        # records a boolean as a number (0 or 1).
        _experiment, start, _end = hparams(
            {key: hparam_value(value) for key, value in params.items()}, {}
        )
        # The experiment summary is left out: with one, TensorBoard takes the columns
        # from the first run's summary it finds (the metrics: none, as the ones a fit
        # will log are unknown here). Without, it builds them from every run: each
        # hyperparameter's values over the runs, and each scalar tag as a metric. The
        # session's end (torch's says success) is written when the fit has succeeded.
        self._pending.append((time.time(), trainer.global_step, start))


def _logged_steps(run_dir: Path, before: int) -> LoggedSteps:
    """The last step below ``before`` that each tag holds in ``run_dir``'s event
    files, as TensorBoard shows them: a restart marker (an earlier resume's) hides
    the steps from its own on that the files read before it hold. Steps from
    ``before`` on are hidden by this resume's marker and written anew."""
    # The raw records, parsed here: EventFileLoader's conversions of each event took
    # 2.6 s of CPU for 20,000 events of 5 scalars, against 0.45 s this way.
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    # Each tag's steps in the order written; a run writes its steps in increasing
    # order, so a marker drops a tail of each list.
    steps: dict[str, list[int]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        if not path.is_file():
            continue
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            if event.session_log.status == SessionLog.START:
                for written in steps.values():
                    while written and written[-1] >= event.step:
                        written.pop()
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return LoggedSteps.from_records(
        (tag, step) for tag, written in steps.items() for step in written if step < before
    )


def _wait_for_a_later_file_name(run_dir: Path) -> None:
    """TensorBoard reads a run's files in name order, and a name starts with the
    second it was created in, then the host, process id and a per-process counter,
    which do not sort by time. A restart marker must be read after the old events,
    so its file must be created in a later second than theirs."""
    newest = max(
        (int(m.group(1)) for entry in os.listdir(run_dir) if (m := _EVENT_FILE.match(entry))),
        default=None,
    )
    if newest is not None:
        delay = newest + 1 - time.time()
        if delay > 0:
            time.sleep(min(delay, 1.0))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _tag(scope: str, name: str) -> str:
    """``val_acc`` published after a validation is written as ``val/acc``."""
    prefix = _SCOPE_PREFIX.get(scope, "")
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return f"{_SCOPE_TAG.get(scope, scope)}/{name}"


def _current_lrs(trainer: Trainer) -> list[list[float]]:
    return [[group["lr"] for group in optimizer.param_groups] for optimizer in trainer.optimizers]


def _lr_tags(lrs: list[list[float]]) -> list[tuple[str, float]]:
    """Tags for the learning rates of each optimizer's parameter groups."""
    several = len(lrs) > 1
    return [
        (f"lr/optimizer_{k}/group_{g}" if several else f"lr/group_{g}", float(lr))
        for k, groups in enumerate(lrs)
        for g, lr in enumerate(groups)
        if lr is not None
    ]
