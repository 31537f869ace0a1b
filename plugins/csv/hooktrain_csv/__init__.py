"""A ``metrics.csv`` file per run for hooktrain, written with the standard library's
``csv`` module (entry-point name ``csv``).

The smallest of the loggers built on `hooktrain.loggers`, the mould the
``tensorboard`` and ``mlflow`` plugins share: options checked when constructed,
versioned run folders, hyperparameters, writing on the global-zero process only,
values waiting in memory until a flush point, and a resumed run that writes no step
twice.

Each fit writes to ``<log_dir>/<name>/version_<n>/``:

* ``metrics.csv``: one row per publication (``log_metrics``), with ``step``,
  ``epoch`` and one column per metric: ``loss`` (published every
  ``log_every_n_steps``), ``loss_epoch`` (the epoch's mean), ``val_loss``... A cell
  is empty where the row's publication did not hold that metric. A column that first
  appears later (``val_loss`` after the first validation) widens the header: the file
  is rewritten once, through a temporary file, with every earlier row kept.
* ``hparams.json``: the trainer's settings, the model's ``hparams`` and the
  plugin's ``hparams`` option, when a fit that does not resume starts.

A fit resumed from a checkpoint at step ``s`` continues the file its checkpoint names:
the rows past ``s`` (what the interrupted run wrote after the checkpoint, or a later
part of the run when it resumes from an earlier checkpoint) are removed, as
TensorBoard hides the steps after its restart marker, and written anew; the values
the file holds at ``s`` are not written again.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain import ConfigurationError, hookimpl
from hooktrain.loggers import (
    FlushSchedule,
    LoggedSteps,
    check_flags_and_hparams,
    check_version,
    collect_hparams,
    experiment_dir,
    load_state,
    metric_key,
    save_state,
    version_dir,
)

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["CSVLogger", "read_logged_steps"]
__version__ = "0.1.0"

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.json"
#: The columns every row has, first in the header.
INDEX_COLUMNS = ("step", "epoch")


class CSVLogger:
    """A hooktrain plugin writing the published metrics to a CSV file (entry-point
    name ``csv``).

    :param log_dir: the root folder of all runs.
    :param name: the experiment's folder under ``log_dir``; ``""`` puts the
        versions right under ``log_dir``.
    :param version: write into ``version_<version>`` (an int) or a folder of this
        name (a string) instead of the next free version; a fit that does not
        resume then starts that folder's ``metrics.csv`` anew.
    :param log_hparams: write ``hparams.json`` when a fit that does not resume starts.
    :param hparams: more hyperparameters to record with the trainer's settings.
    :param flush_secs: published rows are written at least this often, in seconds
        (checked whenever values are published), and at every epoch's end (at most
        once a second), every checkpoint, exception and teardown.
    :param max_queue: publications kept waiting before a write is forced; ``1``
        writes each row as it is published.
    :raises ConfigurationError: (a ``ValueError``) ``flush_secs`` is not > 0,
        ``max_queue`` is not an integer >= 1, or ``version`` is none of ``None``, an
        integer >= 0 and a non-empty string.
    """

    #: Registered under this name when passed as an object.
    name = "csv"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "logs",
        *,
        name: str = "default",
        version: int | str | None = None,
        log_hparams: bool = True,
        hparams: Mapping[str, Any] | None = None,
        flush_secs: float = 5.0,
        max_queue: int = 1000,
    ) -> None:
        self._schedule = FlushSchedule(flush_secs, max_queue, owner="csv")
        check_version(version, "csv")
        check_flags_and_hparams("csv", hparams, log_hparams=log_hparams)
        self.log_dir = Path(log_dir)
        self.run_name = name
        self.version = version
        self.log_hparams = log_hparams
        self.extra_hparams = dict(hparams or {})

        #: The version folder of the latest fit, once chosen (validate and test
        #: write there too); ``None`` on processes other than the global-zero one.
        self.run_dir: Path | None = None
        # The header of the file as written, and the rows waiting for a flush point.
        self._columns: list[str] = []
        self._pending: list[dict[str, Any]] = []
        self._logged = LoggedSteps()
        # In a resumed fit, until its first write: the checkpoint's step, past which
        # the file's rows are the interrupted run's, replaced by this one's.
        self._cut_after: int | None = None
        # Set by on_load_checkpoint for the fit that follows: the version folder the
        # checkpoint's run wrote to (None when it does not say).
        self._resume: tuple[str | None] | None = None

    @property
    def metrics_path(self) -> Path | None:
        """``<run_dir>/metrics.csv``, once the run folder is chosen."""
        return None if self.run_dir is None else self.run_dir / METRICS_FILE

    # ------------------------------------------------------------------ hooks

    # --8<-- [start:hooks]
    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        own = load_state(trainer, self, checkpoint)
        self._resume = (str(own["version"]) if own and own.get("version") else None,)

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        save_state(trainer, self, checkpoint, {"version": self.run_dir.name})
        # What was published before the checkpoint is in the file when the
        # checkpoint is, and the publication right after it (its own step's) goes at
        # once: a resumed run publishes neither again.
        self._flush()
        self._schedule.checkpointed()

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        resume, self._resume = self._resume, None
        self._pending, self._columns, self._logged = [], [], LoggedSteps()
        self._cut_after = None
        version = resume[0] if resume else None
        root = experiment_dir(self.log_dir, self.run_name)
        # A checkpoint without this plugin's state starts a new version.
        self.run_dir = root / version if version else None
        if not trainer.is_global_zero:
            return
        if self.run_dir is None:
            self.run_dir = version_dir(root, self.version)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            if self.log_hparams:
                params = collect_hparams(trainer, self.extra_hparams)
                _write_json(self.run_dir / HPARAMS_FILE, params)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._columns, self._logged = _read_back(self.run_dir / METRICS_FILE, trainer.global_step)
        # Removed at the first write, not now: a resume that fails before writing
        # anything leaves the file as it found it.
        self._cut_after = trainer.global_step

    @hookimpl
    def log_metrics(
        self, trainer: Trainer, metrics: Mapping[str, float], step: int, scope: str
    ) -> None:
        """Keep a row of what the trainer published (floats already: no device sync)."""
        if not trainer.is_global_zero:
            return
        if self.run_dir is None:  # validate or test before any fit
            self.run_dir = version_dir(experiment_dir(self.log_dir, self.run_name), self.version)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        values = {metric_key(name, scope): value for name, value in metrics.items()}
        taken = [key for key in INDEX_COLUMNS if key in values]
        if taken:
            # The row's own step and epoch would be overwritten, and a resume could
            # no longer read the steps back.
            raise ConfigurationError(
                f"csv: a metric named {taken[0]!r} would replace the file's own {taken[0]!r} "
                f"column; log it under another name (such as 'epoch_fraction')"
            )
        if trainer.stage == "fit":
            # Only a resumed fit meets steps its file holds already.
            values = self._logged.fresh(values, step)
        if values:
            self._pending.append({"step": step, "epoch": trainer.current_epoch, **values})
        if self._schedule.due(scope, len(self._pending)):
            self._flush()

    @hookimpl
    def on_exception(self) -> None:
        self._flush()

    @hookimpl
    def teardown(self) -> None:
        self._flush()

    # --8<-- [end:hooks]

    # ------------------------------------------------------------------ writing

    def _flush(self) -> None:
        """Write the waiting rows: appended when their columns are all in the
        header, else the whole file rewritten with the widened header."""
        path = self.metrics_path
        if not self._pending or path is None:
            return
        pending, self._pending = self._pending, []
        if self._cut_after is not None:
            _remove_rows_after(path, self._cut_after)
            self._cut_after = None
        columns = list(self._columns or INDEX_COLUMNS)
        for row in pending:
            columns.extend(key for key in row if key not in columns)
        if columns == self._columns:
            with path.open("a", newline="", encoding="utf-8") as file:
                csv.DictWriter(file, columns).writerows(pending)
        else:
            # A reader expects every row to have the header's fields, so a new
            # column means rewriting the rows before it (once per new column).
            earlier = _read_table(path)[1] if self._columns else []
            _write_table(path, columns, [*earlier, *pending])
            self._columns = columns
        self._schedule.done()


def read_logged_steps(path: str | os.PathLike[str]) -> LoggedSteps:
    """The last step each column of a ``metrics.csv`` holds a value at (empty for a
    missing file)."""
    if not Path(path).is_file():
        return LoggedSteps()
    return _logged_steps(_read_table(Path(path))[1])


def _read_back(path: Path, resume_step: int) -> tuple[list[str], LoggedSteps]:
    """The header of an existing ``metrics.csv`` and the steps its columns hold up
    to ``resume_step``."""
    if not path.is_file():
        return [], LoggedSteps()
    _drop_partial_last_line(path)
    columns, rows = _read_table(path)
    return columns, _logged_steps([row for row in rows if int(row["step"]) <= resume_step])


def _remove_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` without its rows past ``step`` (when it has any)."""
    if not path.is_file():
        return
    columns, rows = _read_table(path)
    kept = [row for row in rows if int(row["step"]) <= step]
    if len(kept) < len(rows):
        _write_table(path, columns, kept)


def _logged_steps(rows: list[dict[str, str]]) -> LoggedSteps:
    return LoggedSteps.from_records(
        (key, int(row["step"]))
        for row in rows
        for key, value in row.items()
        if key not in INDEX_COLUMNS and value not in ("", None)
    )


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header of ``path`` and its rows."""
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_table(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``columns`` and ``rows``, through a temporary file, so
    that a process killed while writing leaves the old file whole."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _drop_partial_last_line(path: Path) -> None:
    """A process killed in the middle of appending a row leaves part of it: cut the
    file back to its last complete line."""
    with path.open("rb+") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            file.truncate(data.rfind(b"\n") + 1)


def _write_json(path: Path, params: Mapping[str, Any]) -> None:
    # JSON keeps numbers, strings, booleans, None and lists as they are; anything
    # else is recorded as its str.
    path.write_text(json.dumps(dict(params), indent=2, default=str) + "\n", encoding="utf-8")
