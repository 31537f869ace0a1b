"""Early stopping for hooktrain: end ``fit`` when a monitored metric stops improving.

Written only against hooktrain's public API (``hooktrain.hookimpl``, the hooks and
the trainer's public attributes); it is the worked example of the documentation page
"Writing a plugin". Select it by name::

    Trainer(plugins=[("early_stopping", {"monitor": "val_loss", "patience": 3})])

Its state (best value, checks without improvement) is saved in checkpoints under
``checkpoint["plugins"][<its registered name>]`` and restored on resume, so a run
that resumes counts patience exactly as a run that was never interrupted.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.options import why_fit_never_validates

if TYPE_CHECKING:
    from hooktrain import Trainer

__all__ = ["EarlyStopping"]
__version__ = "0.1.0"

_MODES = ("min", "max")


# --8<-- [start:class]
class EarlyStopping:
    """Stop training when ``monitor`` has not improved for ``patience`` checks.

    A validation metric (``val_*``) is judged at the end of every validation in
    ``fit``, as Lightning's ``EarlyStopping`` judges it: at an epoch's end, and at
    each step-wise one (``val_every_n_steps``), never on a stale value. A stop decided
    inside an epoch ends the run at that step. A ``val_*`` metric in a fit that
    never validates is refused before the first epoch. Any other metric (``loss``)
    is judged at the end of each training epoch.
    On several processes the decision is agreed: a stop any process decides is
    recorded by all of them, printed by rank 0 and saved in its checkpoints.

    :param monitor: the metric to watch, as named in ``trainer.metrics``.
    :param patience: checks in a row without improvement after which the run stops,
        as Lightning's and Keras's ``patience``: with 3, the third check that does
        not improve on the best stops it (``0`` and ``1`` both stop at the first).
    :param min_delta: the smallest change that counts as an improvement.
    :param mode: ``"min"`` when lower is better (losses), ``"max"`` when higher is
        better (accuracy).
    :param check_finite: stop at once when the monitored value is NaN or infinite.
        Without it a NaN improves on nothing (and counts toward ``patience``).
    :param verbose: print one line to stderr (on rank 0) when the run stops.
    :raises ConfigurationError: here, for a bad option; in ``on_fit_start``, for a
        ``val_*`` monitor in a fit that never validates; at the first check, for a
        metric that was not logged (on any process: all of them raise).
    """

    #: the registered name when the plugin is passed as an object
    name = "early_stopping"

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 3,
        min_delta: float = 0.0,
        mode: str = "min",
        check_finite: bool = True,
        verbose: bool = True,
    ) -> None:
        from hooktrain import ConfigurationError

        if mode not in _MODES:
            raise ConfigurationError(f"early_stopping: mode must be 'min' or 'max', not {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigurationError(
                f"early_stopping: patience must be an integer >= 0, got {patience!r}"
            )
        if not min_delta >= 0:
            raise ConfigurationError(f"early_stopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.check_finite = check_finite
        self.verbose = verbose
        #: the best value seen so far (``None`` before the first check)
        self.best: float | None = None
        #: checks in a row without improvement
        self.wait = 0
        #: the epoch at which this plugin stopped the run, else ``None``
        self.stopped_epoch: int | None = None
        #: why the run stopped, in words, else ``None``
        self.stop_reason: str | None = None

    # --8<-- [end:class]

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best value by more than ``min_delta``; a NaN
        beats nothing, and nothing is beaten by it."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    # --8<-- [start:hooks]
    @hookimpl
    def setup(self, stage: str) -> None:
        # A new fit starts afresh; a resumed one gets its state back afterwards, in
        # on_load_checkpoint.
        if stage == "fit":
            self.best, self.wait, self.stopped_epoch, self.stop_reason = None, 0, None, None

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self._check_monitor_can_exist(trainer)
        # A run restored from a checkpoint taken after this plugin stopped it stays
        # stopped: resuming a finished run must not train more. Said, whatever
        # verbose is: a rerun with a larger max_epochs or patience would otherwise
        # end at once without a word.
        if self.stopped_epoch is not None:
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(
                    f"hooktrain: early_stopping stopped this run at epoch {self.stopped_epoch} "
                    f"({self.stop_reason or 'no reason saved'}); the resumed fit trains no "
                    f"more. To train on, start a new run from its weights (another "
                    f"checkpoint dirpath)",
                    file=sys.stderr,
                )

    # trylast: a value another plugin logs in its on_validation_end belongs to this
    # validation too. (Checkpoints are saved after the validation, not in it.)
    @hookimpl(trylast=True)
    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit" and self.monitor.startswith("val_"):
            where = f"the validation at epoch {trainer.current_epoch}, step {trainer.global_step}"
            self._check(trainer, where)

    # tryfirst: decide before a plugin that saves checkpoints at the epoch's end, so
    # that the state it saves includes this decision.
    @hookimpl(tryfirst=True)
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if not self.monitor.startswith("val_"):
            self._check(trainer, f"the end of epoch {trainer.current_epoch}")

    def _check(self, trainer: Trainer, where: str) -> None:
        """Judge the monitored value, agreeing with every other process."""
        missing = self.monitor not in trainer.metrics
        reason = None if missing else self._judge(trainer.metrics[self.monitor])
        missing_on, stopping_on = self._agree(trainer, missing, reason is not None)
        if missing_on:
            from hooktrain import ConfigurationError
            from hooktrain.errors import closest_name

            ranks = ""
            if len(missing_on) < trainer.world_size:
                ranks = f" on rank {', '.join(map(str, missing_on))}"
            known = ", ".join(sorted(trainer.metrics)) or "none"
            close = closest_name(self.monitor, trainer.metrics)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ConfigurationError(
                f"early_stopping monitors {self.monitor!r}, which was not logged by {where}"
                f"{ranks}.{hint} Metrics available: {known}"
            )
        if stopping_on:
            if reason is None:
                reason = (
                    f"decided on rank {', '.join(map(str, stopping_on))}, whose value of "
                    f"{self.monitor} differs from rank {trainer.global_rank}'s"
                )
            self._stop(trainer, reason)

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        name = trainer.plugin_manager.get_name(self) or self.name
        checkpoint["plugins"][name] = self.state_dict()

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        name = trainer.plugin_manager.get_name(self) or self.name
        state = checkpoint.get("plugins", {}).get(name)
        if state is not None:
            self.load_state_dict(state)

    # --8<-- [end:hooks]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: plain numbers and strings only, so that it loads
        with ``torch.load(..., weights_only=True)``."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. State saved for another metric
        or mode is ignored (with a note on stderr): its best value means nothing now."""
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            print(
                f"hooktrain: early_stopping state in the checkpoint watched "
                f"{state.get('monitor')!r} ({state.get('mode')}); now {self.monitor!r} "
                f"({self.mode}): starting afresh",
                file=sys.stderr,
            )
            return
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state.get("wait", 0))
        stopped = state.get("stopped_epoch")
        self.stopped_epoch = None if stopped is None else int(stopped)
        reason = state.get("stop_reason")
        self.stop_reason = None if reason is None else str(reason)

    def _judge(self, value: float) -> str | None:
        """Fold this process's ``value`` into ``best`` and ``wait``; the reason to
        stop, or ``None`` to go on."""
        if self.check_finite and not math.isfinite(value):
            return f"{self.monitor} is {value}"
        if self.improved(value):
            self.best = value
            self.wait = 0
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        if self.best is None:
            return (
                f"{self.monitor} was NaN at {self.wait} checks in a row (patience {self.patience})"
            )
        return (
            f"{self.monitor} did not improve on {self.best:.6g} for {self.wait} "
            f"checks (patience {self.patience})"
        )

    @staticmethod
    def _agree(trainer: Trainer, missing: bool, stop: bool) -> tuple[list[int], list[int]]:
        """The ranks where the monitored metric is missing, and those that would
        stop: one ``trainer.all_reduce``, made at the same point on every process.

        A value logged outside the batches (in an epoch-end hook) is each process's
        own, so processes may judge differently. The core stops all of them if any
        one sets ``should_stop``, but the others would not know that this plugin
        stopped the run: rank 0, which prints and writes checkpoints, would save
        ``stopped_epoch=None`` and a resume would train on. Likewise one process
        raising alone would leave the others waiting in their next collective.
        """
        import torch

        flags = torch.zeros(2, trainer.world_size, device=trainer.device)
        flags[0, trainer.global_rank] = float(missing)
        flags[1, trainer.global_rank] = float(stop)
        missing_flags, stop_flags = trainer.all_reduce(flags).tolist()
        return (
            [rank for rank, flag in enumerate(missing_flags) if flag],
            [rank for rank, flag in enumerate(stop_flags) if flag],
        )

    def _check_monitor_can_exist(self, trainer: Trainer) -> None:
        """Refuse, before the first epoch, a validation metric in a fit that never
        validates: every epoch would pass unjudged, without a word."""
        if not self.monitor.startswith("val_"):
            return  # any other name may be logged by anyone; the first check tells
        why = why_fit_never_validates(trainer)
        if why is not None:
            from hooktrain import ConfigurationError

            raise ConfigurationError(
                f"early_stopping monitors {self.monitor!r}, a validation metric, but {why}: "
                f"it would never be checked. Validate (pass val_dataloaders, validate more "
                f"often), or monitor a training metric such as 'loss'"
            )

    def _stop(self, trainer: Trainer, reason: str) -> None:
        trainer.should_stop = True
        self.stopped_epoch = trainer.current_epoch
        self.stop_reason = reason
        if self.verbose and trainer.is_global_zero:
            print(
                f"hooktrain: early stopping at epoch {trainer.current_epoch}: {reason}",
                file=sys.stderr,
            )
