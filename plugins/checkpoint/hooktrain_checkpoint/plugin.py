"""The ``checkpoint`` plugin's hooks: when to save, where, and how to resume."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError, warn_user
from hooktrain.options import why_fit_never_validates
from hooktrain_checkpoint import resume, sharded, storage, topk
from hooktrain_checkpoint.lock import DirectoryLock
from hooktrain_checkpoint.sigterm import SigtermWatch, report
from hooktrain_checkpoint.steps import StepSaver
from hooktrain_checkpoint.storage import LAST_NAME
from hooktrain_checkpoint.writer import (
    BackgroundWriter,
    file_record,
    write_now_or_in_background,
)

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["ModelCheckpoint", "StepSaver"]


class ModelCheckpoint:
    """Saves checkpoints atomically and resumes from them exactly.

    Options carry the names Lightning users know.

    :param dirpath: the directory the checkpoints go to (created when needed). A
        relative path (or one starting with ``~``) is resolved when the plugin is
        built, as Lightning's ``ModelCheckpoint`` does: a script that changes its
        working directory later still saves, and resumes, where it said.
    :param filename: the name pattern of top-k checkpoints, without ``.ckpt``;
        ``{epoch}``, ``{step}`` and any metric name, with an optional format
        (``"{epoch}-{val_loss:.3f}"`` gives ``epoch=2-val_loss=0.123.ckpt``). A
        name that a kept checkpoint has already gets ``-v1``, ``-v2``...: a kept
        checkpoint is overwritten only by a save of its own global step (at the
        epoch's end, after a step-wise save of its last batch).
    :param monitor: the metric that ranks checkpoints; ``None`` ranks by recency. A
        ``val_*`` metric ranks only saves of the weights it was computed on.
    :param mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
    :param save_top_k: how many ranked checkpoints to keep; ``-1`` keeps every
        one, ``0`` none (only ``last``).
    :param save_last: always keep ``last.ckpt``, the newest state (and save the
        final state when ``fit`` ends).
    :param every_n_train_steps: save every N optimizer steps (mid-epoch included),
        through a :class:`StepSaver` that ``setup`` registers for the fit; without
        it, the plugin adds no call per step. Read when a fit starts.
    :param every_n_epochs: save at the end of every N-th epoch; the default is 1
        when ``every_n_train_steps`` is not set either.
    :param async_save: copy the state on the training thread and write it on a
        background thread; ``False`` writes before training continues.
    :param save_on_sigterm: on SIGTERM, save at the next batch boundary and stop
        (as ``last.ckpt`` even with ``save_last=False``).
    :param verbose: print where each checkpoint went (on rank 0).
    :raises ConfigurationError: for an unknown ``mode``, a ``save_top_k`` below -1,
        an ``every_n_*`` below 1, or a ``filename`` holding a directory separator, a
        stray brace, or a format its field's value refuses.
    """

    name = "checkpoint"
    # It answers load_checkpoint (what ckpt_path="last" means, and where it is) and
    # owns the process's SIGTERM handler. A second such plugin would resolve "last"
    # in another directory, and only one of the two would hear the signal; it is
    # refused when the Trainer is built.
    exclusive_roles = ("checkpoint-io",)

    def __init__(
        self,
        dirpath: str | os.PathLike[str] = "checkpoints",
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        async_save: bool = True,
        save_on_sigterm: bool = True,
        verbose: bool = False,
    ) -> None:
        topk.check_ranking(mode, save_top_k)
        for option, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("every_n_epochs", every_n_epochs),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(
                    f"checkpoint: {option} must be an integer >= 1 or None, got {value!r}"
                )
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.dirpath = Path(dirpath).expanduser().absolute()
        self.filename = filename or "{epoch}-{step}"
        topk.check_pattern(self.filename)
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.async_save = async_save
        self.save_on_sigterm = save_on_sigterm
        self.verbose = verbose

        #: File name to monitored score (to recency with no ``monitor``) of every
        #: ranked checkpoint kept, best first after each save.
        self.best_k_models: dict[str, float] = {}
        #: Path of the newest checkpoint written, ``None`` before the first.
        self.last_model_path: Path | None = None
        #: True once a SIGTERM stopped the run (after its checkpoint was written).
        self.interrupted = False
        #: Seconds the training thread spent on each save (building the state,
        #: copying it, waiting for the previous write, handing it off).
        self.save_costs: list[float] = []
        #: Of each ``save_costs`` entry, the seconds spent waiting for the previous
        #: write to finish (non-zero only when saves come faster than writes).
        self.wait_costs: list[float] = []
        #: Seconds each write took (serialise, hash, fsync, rename), wherever it ran.
        self.write_costs: list[float] = []
        self._writer = BackgroundWriter()
        self._sigterm = SigtermWatch()
        self._lock = DirectoryLock()
        self._step_saver: StepSaver | None = None
        self._sequence = 0
        # The global step of each file in best_k_models: a second ranked save of one
        # step (at the epoch's end after its last batch) replaces its own file.
        self._kept_steps: dict[str, int] = {}
        self._evicting: list[str] = []  # by the save being made, once it is written
        # The global step whose weights the last validation inside fit saw: a
        # val_* score ranks only a checkpoint of those weights.
        self._validated_step = -1
        self._saved_progress: tuple[Any, ...] | None = None
        self._resumed_progress: tuple[Any, ...] | None = None  # of the file resumed
        self._warned_monitor = False
        self._loaded_from: str | None = None
        self._inline: bool | None = None  # decided at a fit's first save

    # ------------------------------------------------------------------ public

    @property
    def best_model_path(self) -> Path | None:
        """The best ranked checkpoint kept (the newest with no ``monitor``)."""
        if not self.best_k_models:
            return None
        return self.dirpath / self._ranked()[0]

    @property
    def last_path(self) -> Path:
        """Where ``last.ckpt`` lives."""
        return self.dirpath / (LAST_NAME + storage.SUFFIX)

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is on disk.

        :raises CheckpointWriteError: when writing it failed.
        """
        self._writer.wait()

    def format_name(self, trainer: Trainer) -> str:
        """The file name (with ``.ckpt``) that ``filename`` gives for the current state."""
        values = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        return topk.render_name(self.filename, values, trainer.metrics)

    # ------------------------------------------------------------------ hooks: setup

    @hookimpl(wrapper=True)
    def setup(self, trainer: Trainer, stage: str) -> Generator[None, None, None]:
        # A wrapper: the step saver is registered before any other setup runs, in
        # particular the profile plugin's (tryfirst), which times the implementations
        # registered when it runs. The rest comes after every other setup, when
        # plugins that set the process's rank have done so.
        if stage == "fit" and self.every_n_train_steps is not None:
            saver = StepSaver(self)
            trainer.plugin_manager.register(saver, f"{self._own_name(trainer)}.steps")
            self._step_saver = saver  # only once registered: teardown unregisters it
        result = yield
        if stage == "fit":
            # A new fit counts steps from 0 again and ranks its own saves (a resumed
            # fit gets its ranking back when loading); its step N is not saved yet.
            self._kept_steps = {}
            self.best_k_models = {}
            self._saved_progress = self._resumed_progress = None
            self._validated_step = -1
            never = topk.never_validated_message(
                self.monitor, why_fit_never_validates(trainer)
            ) or topk.never_ranked_message(
                self.monitor, self.every_n_epochs, trainer.val_every_n_steps
            )
            if never is not None and self.save_top_k != 0 and trainer.is_global_zero:
                warn_user(never)
                self._warned_monitor = True  # its cause is said: no guess at each save
            self._inline = None
            self.interrupted = False
            self._sigterm = SigtermWatch()
            if trainer.is_global_zero:
                storage.prepare_directory(self.dirpath)
                # Held before the resume reads the directory, until the last write.
                self._lock.acquire(self.dirpath)
            if self.save_on_sigterm:
                self._sigterm.install(trainer)
        return result

    @hookimpl(wrapper=True)
    def teardown(self, trainer: Trainer, stage: str) -> Generator[None, None, None]:
        # A wrapper: the wait for the last write comes after every other plugin's
        # teardown (closing event files and bars), whatever the plugin order, so it
        # overlaps them; and it runs even when one of them raises.
        try:
            return (yield)
        finally:
            if stage == "fit":
                self._end_fit(trainer)

    def _end_fit(self, trainer: Trainer) -> None:
        try:
            # A run never ends with a write in flight, even when it failed.
            self._writer.close()
        finally:
            self._lock.release()
            self._sigterm.restore()
            if self._step_saver is not None:
                trainer.plugin_manager.unregister(self._step_saver)
                self._step_saver = None

    # ------------------------------------------------------------------ hooks: saving

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self.save_on_sigterm and trainer.world_size > 1:
            # From here to the epoch's end the core agrees on should_stop after every
            # optimizer step, so the handler may set it directly (set first, so a
            # signal between the two lines is not lost).
            self._sigterm.inside_epoch = True
            if self._sigterm.agreed(trainer):
                trainer.should_stop = True

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.save_on_sigterm and trainer.world_size > 1:
            # A signal since the epoch's last optimizer step reached this process
            # only; agree on it before the core decides whether to go on.
            self._sigterm.inside_epoch = False
            if self._sigterm.agreed(trainer):
                trainer.should_stop = True
        # A save that is due happens even when a SIGTERM stops the run after this
        # epoch; on_fit_end then finds the state saved and only reports.
        every = self.every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._save(trainer, ranked=True)

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit":
            self._validated_step = trainer.global_step

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        # Every process reaches fit end once, so agreeing here is a balanced
        # collective: all of them take the same path below (dump_checkpoint may run
        # collectives of its own), and only rank 0 writes.
        if self.save_on_sigterm and trainer.world_size > 1:
            self._sigterm.inside_epoch = False
            self._sigterm.agreed(trainer)
        if self.save_on_sigterm and self._sigterm.received:
            if not trainer.finished:
                self._stop_on_sigterm(trainer)
                return
            # At the run's last step: not interrupted, or a scheduler requeues it.
            report(trainer, "SIGTERM received at the run's last step; the run finished")
        # The final state is saved too, so that rerunning a finished command with
        # ckpt_path="last" finds nothing left to do.
        if (
            self.save_last
            and trainer.sync_gradients
            and resume.progress(trainer) != self._saved_progress
        ):
            self._save(trainer, ranked=False)
        # No wait here: teardown waits, so the last write overlaps the other
        # plugins' fit end and teardown (closing event files, bars).

    @hookimpl
    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        if self._loaded_from is not None and isinstance(exception, ConfigurationError):
            exception.add_note(f"hooktrain-checkpoint: while restoring {self._loaded_from}")
        if isinstance(exception, KeyboardInterrupt) and self.last_model_path is not None:
            # Ctrl-C: below Python's traceback, where the run can go on from.
            exception.add_note(
                f"hooktrain-checkpoint: the last checkpoint saved is {self.last_model_path}; "
                f"run again with ckpt_path='last' to continue from it"
            )

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        if self.save_on_sigterm:
            # After prepare, where a plugin may have built the loaders the fit uses.
            self._sigterm.shield_workers(trainer)
        if trainer.is_global_zero:
            fresh = self._loaded_from is None
            self._sequence = resume.number_saves_after(self.dirpath, self._sequence, fresh)
        self._loaded_from = None

    def _stop_on_sigterm(self, trainer: Trainer) -> None:
        # The loop has stopped (after an optimizer step, so no half-accumulated
        # gradients) or finished: save that state unless it is saved already, and
        # wait for it, since the scheduler may kill the process soon after.
        if resume.progress(trainer) != self._saved_progress:
            # As last.ckpt even with save_last=False: the work since the last ranked
            # save would be lost, and the resume would start from that save.
            self._save(trainer, ranked=False, stopping=True)
        self._writer.wait()
        trainer.should_stop = trainer.interrupted = True
        self.interrupted = True
        # Nothing was saved when a resume is stopped before it trains a batch.
        idle = resume.progress(trainer) == self._resumed_progress
        done = "nothing trained since the resume" if idle else f"saved {self.last_model_path}"
        report(
            trainer,
            f"SIGTERM received; {done} (epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}); stopped. Run the same command with "
            f"ckpt_path='last' to continue.",
        )

    # ------------------------------------------------------------------ saving

    def _score(self, trainer: Trainer) -> float | None:
        if self.monitor is None:
            return float(trainer.global_step)
        if self.monitor.startswith("val_") and self._validated_step != trainer.global_step:
            # These weights were not validated (an epoch that skips validation, a
            # step between validations): the value is older weights'.
            return None
        metrics = trainer.metrics
        if self.monitor in metrics:
            return float(metrics[self.monitor])
        if not self._warned_monitor and trainer.is_global_zero:
            where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            self._warned_monitor = True
            print(topk.missing_monitor_message(self.monitor, metrics, where), file=sys.stderr)
        return None

    def _effective_mode(self) -> str:
        return "max" if self.monitor is None else self.mode

    def _ranked(self) -> list[str]:
        """Names in ``best_k_models``, best first."""
        return topk.ranked(self.best_k_models, self._effective_mode())

    def _save(self, trainer: Trainer, *, ranked: bool, stopping: bool = False) -> None:
        started = time.perf_counter()
        self._writer.wait()  # one write at a time; surfaces the previous one's error
        waited = time.perf_counter() - started
        ranked_name: str | None = None
        evicted: list[str] = []
        before = (
            dict(self.best_k_models),
            dict(self._kept_steps),
            self._sequence,
            self._saved_progress,
            self._evicting,
        )
        if ranked and self.save_top_k != 0:
            score, name = self._score(trainer), self.format_name(trainer)
            if trainer.world_size > 1:
                from hooktrain.running_means import process_collectives

                # Values inside an epoch are each process's own (its batch's loss):
                # rank 0's decide for all, or sharded saves go to different places.
                score, name = process_collectives(trainer).all_gather_object((score, name))[0]
            if score is not None:
                ranked_name, evicted = topk.enter(
                    self.best_k_models,
                    name,
                    score,
                    self.save_top_k,
                    self._effective_mode(),
                    steps=self._kept_steps,
                    step=trainer.global_step,
                )
        self._sequence += 1
        self._saved_progress = resume.progress(trainer)
        self._evicting = [name for name in evicted if name != ranked_name]
        # Every process builds the checkpoint, whatever it decided about ranking:
        # plugins' on_save_checkpoint may run collectives. Only rank 0 writes.
        try:
            checkpoint = trainer.dump_checkpoint()
        except BaseException:
            # Not written (weights a NaN loss trained are refused): the ranking stays
            # that of the files on disk, which best_model_path must name.
            (
                self.best_k_models,
                self._kept_steps,
                self._sequence,
                self._saved_progress,
                self._evicting,
            ) = before
            raise
        if ranked_name is None and not (self.save_last or stopping):
            return
        if trainer.is_global_zero and not self.dirpath.exists():
            # Removed during the run (a clean-up script): made again, lock included,
            # rather than failing the run and losing its work.
            storage.prepare_directory(self.dirpath)
            self._lock.release()
            self._lock.acquire(self.dirpath)
            report(trainer, f"{self.dirpath} was removed during the run; made it again")
        target = self.dirpath / ranked_name if ranked_name else self.last_path
        self.last_model_path = self.last_path if self.save_last else target
        link = self.last_path if ranked_name and self.save_last else None
        evicted_paths = [self.dirpath / name for name in self._evicting]
        record = file_record(checkpoint, self._sequence)
        if sharded.is_sharded(checkpoint):
            # Every process writes its shards, now (a collective, not in the background).
            sharded.save(trainer, checkpoint, target, record, also=link)
            if trainer.is_global_zero:
                for path in evicted_paths:
                    sharded.remove(path)
        elif trainer.is_global_zero:
            write_now_or_in_background(
                checkpoint,
                record,
                target,
                link=link,
                evicted=evicted_paths,
                background=self._writer if self.async_save else None,
                encode_inline=self.async_save and self._encodes_inline(trainer),
                verbose=self.verbose,
                costs=self.write_costs,
            )
        else:
            return  # another process's plain save: rank 0 writes it
        self.save_costs.append(time.perf_counter() - started)
        self.wait_costs.append(waited)

    def _encodes_inline(self, trainer: Trainer) -> bool:
        if self._inline is None:  # judged once per fit
            self._inline = storage.small_enough_to_encode_inline(trainer.module)
        return self._inline

    # ------------------------------------------------------------------ hooks: state

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"][self._own_name(trainer)] = {
            "dirpath": str(self.dirpath),
            "monitor": self.monitor,
            "mode": self.mode,
            "best_k_models": dict(self.best_k_models),
            "kept_steps": dict(self._kept_steps),
            "evicting": self._evicting,
            "validated_step": self._validated_step,
            "sequence": self._sequence,
        }

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        state = checkpoint.get("plugins", {}).get(self._own_name(trainer))
        if state:
            self._sequence = int(state.get("sequence", 0))
            # A resume does not validate again the weights a validation saw.
            self._validated_step = int(state.get("validated_step", -1))
            ranking = resume.restore_ranking(
                state,
                self.dirpath,
                monitor=self.monitor,
                mode=self.mode,
                remove=trainer.is_global_zero,
            )
            if ranking is not None:
                self.best_k_models, self._kept_steps = ranking
        self._saved_progress = self._resumed_progress = resume.saved_progress(checkpoint)
        if trainer.is_global_zero:
            resume.report_differences(trainer, checkpoint)

    def _own_name(self, trainer: Trainer) -> str:
        return trainer.plugin_manager.get_name(self) or self.name

    # ------------------------------------------------------------------ hooks: loading

    @hookimpl
    def load_checkpoint(self, trainer: Trainer, ckpt_path: str) -> Mapping[str, Any] | None:
        resume.check_processes_agree(trainer, ckpt_path, self.dirpath)
        found = resume.load(ckpt_path, self.dirpath, say=trainer.is_global_zero, trainer=trainer)
        if found is None:
            return {}  # nothing to resume from: not None, which would ask the core
        checkpoint, self._loaded_from = found
        return checkpoint
