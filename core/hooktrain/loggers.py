"""What every logger plugin needs, in one place: the mould of ``tensorboard``,
``csv`` and ``mlflow``, for anyone writing another (W&B, Comet, Aim).

A logger plugin built on this module has the same shape as the first-party ones:

* **versioned run folders** (`version_dir`): ``<log_dir>/<name>/version_<n>``, the
  next free ``n`` claimed atomically, so two runs started together never share one;
* **hyperparameters** (`collect_hparams`): the trainer's settings, the model's own
  ``hparams`` mapping and the plugin's ``hparams`` option, as scalars
  (`hparam_value`);
* **metric names** (`metric_key`): what ``log_metrics`` receives, keyed so that a
  training value published at a step and the epoch's mean published at the same
  step never share a name (``loss`` and ``loss_epoch``);
* **rank-0 gating**: only ``trainer.is_global_zero`` opens files or connections;
  every other process returns at the top of each hook (a plain ``if``, kept in the
  plugin where a reader sees it);
* **resume without a step twice**: the plugin's state (its version folder, its run
  id) goes into ``checkpoint["plugins"][<registered name>]`` (`save_state`,
  `load_state`); on resume, `LoggedSteps` remembers the last step each key already
  holds, read back from the destination, and drops what is not past it (the steps a
  crashed run wrote after the checkpoint it resumes from: resume is exact, so the
  values are the same);
* **flush points** (`FlushSchedule`): values wait in memory and are written at an
  epoch's end, every ``flush_secs``, when ``max_queue`` publications wait, at each
  checkpoint and at the publication right after it, on an exception and at teardown,
  so the training loop does no I/O at every publication, and a process killed
  outright loses only values that a resume publishes again;
* **checkpoints as artifacts** (`checkpoint_files`): the files of whichever selected
  plugin keeps checkpoints, found by the attributes Lightning's ``ModelCheckpoint``
  has, so that neither the core nor the logger names a checkpoint plugin.

Nothing here imports torch or a logging library; ``docs/writing-a-plugin.md``
walks through the mould.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = [
    "EPOCH_SUFFIX",
    "FlushSchedule",
    "LoggedSteps",
    "check_flags_and_hparams",
    "check_version",
    "checkpoint_files",
    "collect_hparams",
    "experiment_dir",
    "hparam_value",
    "load_state",
    "metric_key",
    "new_version_dir",
    "registered_name",
    "save_state",
    "version_dir",
]

#: Appended to the name of a training mean published at an epoch's end (``scope
#: "epoch"``): ``loss`` published every few steps and the epoch's ``loss`` mean at
#: the epoch's last step are two series, ``loss`` and ``loss_epoch``.
EPOCH_SUFFIX = "_epoch"
#: At an epoch's end, values are flushed only when the previous flush is at least
#: this many seconds old: a run of many tiny epochs does not pay a write per epoch.
EPOCH_FLUSH_MIN_S = 1.0

_VERSION_DIR = re.compile(r"^version_(\d+)$")
_EVAL_PREFIXES = ("val_", "test_")


# ---------------------------------------------------------------------- run folders


def experiment_dir(log_dir: str | os.PathLike[str], name: str) -> Path:
    """``<log_dir>/<name>``, or ``log_dir`` itself when ``name`` is ``""``."""
    return Path(log_dir) / name if name else Path(log_dir)


def new_version_dir(root: str | os.PathLike[str]) -> Path:
    """Create and return ``root/version_<n>`` for the next free ``n`` (one more
    than the highest ``version_<n>`` folder in ``root``, from 0).

    The folder is claimed with ``mkdir`` (atomic), so runs started together get
    different versions. ``root`` is created when missing.

    :raises OSError: when ``root`` cannot be created or listed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [
        int(match.group(1))
        for entry in os.listdir(root)
        if (match := _VERSION_DIR.match(entry)) and (root / entry).is_dir()
    ]
    number = max(taken, default=-1) + 1
    while True:
        candidate = root / f"version_{number}"
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            continue
        return candidate


def check_version(version: Any, owner: str) -> None:
    """Refuse a ``version`` option that `version_dir` cannot turn into a folder.

    :raises ConfigurationError: (a ``ValueError``) ``version`` is not ``None``, an
        int >= 0 or a non-empty string; ``True`` and ``-1`` are refused, as a folder
        ``version_True`` or ``version_-1`` is a mistake, not a choice.
    """
    if version is None or (isinstance(version, str) and version):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return
    raise ConfigurationError(
        f"{owner}: version must be None (the next free version), an integer >= 0 or "
        f"a folder name, got {version!r}"
    )


def check_flags_and_hparams(owner: str, hparams: Any, **flags: Any) -> None:
    """Refuse a logger's on/off options that are not booleans, and an ``hparams``
    option that is not a mapping.

    :raises ConfigurationError: (a ``ValueError``) a flag is not ``True`` or ``False``
        (the string ``"no"`` is true, and would do the opposite of what it says), or
        ``hparams`` is neither ``None`` nor what ``dict()`` takes (a mapping, or
        pairs of names and values).
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigurationError(f"{owner}: {name} must be True or False, got {value!r}")
    if hparams is None or isinstance(hparams, Mapping):
        return
    try:
        dict(hparams)  # pairs of names and values are taken as dict() takes them
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{owner}: hparams must be a dict of names to values, got {type(hparams).__name__}"
        ) from None


def version_dir(root: str | os.PathLike[str], version: int | str | None) -> Path:
    """The folder a fit that does not resume writes to: ``root/version_<version>``
    for an int, ``root/<version>`` for a string (neither created here), or a new
    version (`new_version_dir`) for ``None``."""
    if version is None:
        return new_version_dir(root)
    folder = f"version_{version}" if isinstance(version, int) else version
    return Path(root) / folder


# ---------------------------------------------------------------------- hyperparameters


def collect_hparams(trainer: Trainer, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's hyperparameters: ``trainer.hparams`` (the trainer's settings and
    plugin list), then the model's own ``hparams`` when it is a mapping (the
    attribute Lightning's ``save_hyperparameters`` fills, read from
    ``trainer.module``, the user's unwrapped model), then ``extra`` (a plugin's
    ``hparams`` option). A later source wins a name both hold. Values are as given;
    see `hparam_value` for a logger that takes scalars only."""
    params = dict(trainer.hparams)
    model_hparams = getattr(trainer.module, "hparams", None)
    if isinstance(model_hparams, Mapping):
        params.update(model_hparams)
    params.update(extra or {})
    return params


def hparam_value(value: Any) -> bool | int | float | str:
    """A hyperparameter as a scalar: numbers, strings and booleans as they are, a
    list or tuple as its items' ``str`` joined by ``", "``, anything else (``None``
    included) as its ``str``."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    return str(value)


# ---------------------------------------------------------------------- metric names


def metric_key(name: str, scope: str) -> str:
    """The name a logger records a published value under, given the ``scope`` of
    ``log_metrics``: ``<name>_epoch`` for a training mean published at an epoch's
    end (``"epoch"``), except names already ``val_``/``test_``; the name itself
    otherwise (``loss`` at a step, ``val_loss`` after a validation)."""
    if scope == "epoch" and not name.startswith(_EVAL_PREFIXES):
        return name + EPOCH_SUFFIX
    return name


# ---------------------------------------------------------------------- resume


def registered_name(trainer: Trainer, plugin: Any) -> str:
    """The name ``plugin`` is registered under in ``trainer`` (its entry-point name
    when selected by name), falling back to its ``name`` attribute."""
    return trainer.plugin_manager.get_name(plugin) or plugin.name


def save_state(
    trainer: Trainer, plugin: Any, checkpoint: dict[str, Any], state: Mapping[str, Any]
) -> None:
    """Store ``state`` (numbers, strings, lists and dicts only, so that the
    checkpoint loads with ``weights_only=True``) under
    ``checkpoint["plugins"][<registered name>]``; call it from ``on_save_checkpoint``."""
    checkpoint.setdefault("plugins", {})[registered_name(trainer, plugin)] = dict(state)


def load_state(
    trainer: Trainer, plugin: Any, checkpoint: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """What `save_state` stored for ``plugin`` in ``checkpoint``; ``None`` when the
    checkpoint holds nothing for it (saved without the plugin, or by an older one)."""
    state = checkpoint.get("plugins", {}).get(registered_name(trainer, plugin))
    return state if isinstance(state, Mapping) else None


class LoggedSteps:
    """The steps each key already holds at its destination, so that a resumed
    run writes every step once.

    A run resumed from a checkpoint at step ``s`` publishes steps ``s + 1``, ... again,
    and the run it resumes may have written some of them before it crashed. Built
    from what the destination holds (a CSV file's rows, an MLflow run's metric
    histories), `fresh` keeps only the values the destination lacks. Keyed by name,
    not by step alone: at one step a crashed run may have written the training
    values but died before the epoch's means.

    :param last: key to the last step written (up to the resume's step, when
        ``held`` is given); empty for a new run.
    :param held: ``(key, step)`` pairs the destination holds past the resume's
        step. The resumed run may publish at other steps than the run it resumes
        did (a smaller ``log_every_n_steps``): those are written, between the held
        ones, where a last step alone would drop every step below it.
    """

    def __init__(
        self, last: Mapping[str, int] | None = None, held: Iterable[tuple[str, int]] = ()
    ) -> None:
        self.last: dict[str, int] = dict(last or {})
        self.held: set[tuple[str, int]] = set(held)

    def fresh(self, values: Mapping[str, float], step: int) -> dict[str, float]:
        """The entries of ``values`` (key to value, published at ``step``) that
        the destination lacks: past the last step their key holds, and not held
        at ``step``. Their steps become the last."""
        kept = {
            key: value
            for key, value in values.items()
            if step > self.last.get(key, -1) and (key, step) not in self.held
        }
        for key in kept:
            self.last[key] = step
        return kept

    @classmethod
    def from_records(
        cls, records: Iterable[tuple[str, int]], after: int | None = None
    ) -> LoggedSteps:
        """From ``(key, step)`` pairs in any order: the highest step of each key,
        or, given the step a run resumes ``after``, the highest up to it and every
        pair past it (for a destination that cannot remove them: MLflow's)."""
        last: dict[str, int] = {}
        held: set[tuple[str, int]] = set()
        for key, step in records:
            if after is not None and step > after:
                held.add((key, step))
            elif step > last.get(key, -1):
                last[key] = step
        return cls(last, held)


# ---------------------------------------------------------------------- checkpoints


def checkpoint_files(trainer: Trainer) -> list[Path]:
    """The last and the best checkpoint of every registered plugin that keeps
    checkpoints: those that exist, each once, a plugin's last before its best. A
    checkpoint is a file, or a directory for a sharded one (the ``checkpoint`` plugin
    under ``fsdp`` writes those).

    A plugin keeps checkpoints, to this function, when it has the attributes
    ``last_model_path`` and ``best_model_path`` (Lightning's ``ModelCheckpoint``
    names, which the ``checkpoint`` plugin has), each a path, a string or ``None``. A
    plugin that writes in the background may not have finished the files before its
    own ``teardown``: call this after it (a ``tryfirst`` wrapper on ``teardown``
    runs its second half after every other implementation).
    """
    found: list[Path] = []
    for _, plugin in trainer.plugin_manager.list_name_plugin():
        keeps = hasattr(plugin, "last_model_path") and hasattr(plugin, "best_model_path")
        if plugin is None or not keeps:
            continue
        for value in (plugin.last_model_path, plugin.best_model_path):
            if isinstance(value, str | os.PathLike):
                path = Path(value)
                if (path.is_file() or path.is_dir()) and path not in found:
                    found.append(path)
    return found


# ---------------------------------------------------------------------- flushing


class FlushSchedule:
    """When values waiting in memory are written: `due` after each publication,
    `done` after each write.

    Writing at each publication would put a file write or a network request in the
    training loop every ``log_every_n_steps``; waiting loses, when the process is
    killed outright, what was published since the last write (an exception or a
    clean end writes everything: the plugin flushes in ``on_exception`` and
    ``teardown``).

    :param flush_secs: write when the last write is at least this old, in seconds
        (checked at each publication).
    :param max_queue: write when this many publications wait.
    :param owner: the plugin's name, which starts the error messages.
    :raises ConfigurationError: (a ``ValueError``) ``flush_secs`` is not > 0 or
        ``max_queue`` is not an integer >= 1.
    """

    def __init__(self, flush_secs: float = 5.0, max_queue: int = 1000, owner: str = "") -> None:
        prefix = f"{owner}: " if owner else ""
        if not (isinstance(flush_secs, int | float) and flush_secs > 0):
            raise ConfigurationError(f"{prefix}flush_secs must be > 0, got {flush_secs!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigurationError(
                f"{prefix}max_queue must be an integer >= 1, got {max_queue!r}"
            )
        self.flush_secs = flush_secs
        self.max_queue = max_queue
        self._flushed_at = time.monotonic()
        self._checkpointed = False

    def due(self, scope: str, waiting: int) -> bool:
        """Whether to write now, after a publication of ``scope``, with ``waiting``
        publications in memory: the last write is ``flush_secs`` old, or this is an
        epoch's end and it is at least `EPOCH_FLUSH_MIN_S` old, or the queue is full,
        or this is the first publication since a checkpoint (`checkpointed`)."""
        since = time.monotonic() - self._flushed_at
        return (
            self._checkpointed
            or since >= self.flush_secs
            or (scope == "epoch" and since >= EPOCH_FLUSH_MIN_S)
            or waiting >= self.max_queue
        )

    def checkpointed(self) -> None:
        """Record that a checkpoint was just taken (call it in ``on_save_checkpoint``,
        after writing what waits): the next publication is written at once.

        The loop publishes a step's values after that step's checkpoint, and a run
        resumed from it starts at the next step: values of the checkpoint's step
        still waiting when the process died would never be published again.
        """
        self._checkpointed = True

    def done(self) -> None:
        """Record that everything waiting was just written."""
        self._flushed_at = time.monotonic()
        self._checkpointed = False
