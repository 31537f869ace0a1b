"""The ``checkpoint`` plugin: when to save, where, and how to resume."""

from __future__ import annotations

import inspect
import math
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain_checkpoint import storage

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["CheckpointWriteError", "ModelCheckpoint", "snapshot"]

LAST_NAME = "last"
#: A checkpoint whose model, with three times its parameters' bytes, stays under this
#: many bytes is encoded on the training thread and only written in the background.
INLINE_ENCODE_LIMIT = 4 << 20
_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint in the background failed; the cause is ``__cause__``."""


def snapshot(obj: Any, _memo: dict[int, Any] | None = None) -> Any:
    """A copy of a checkpoint mapping whose tensors are private CPU copies, so that
    training may go on changing the live ones while the copy is written.

    Containers are rebuilt (dicts, lists, tuples); immutable leaves are shared; a
    tensor referenced twice (tied weights) stays one tensor in the copy.
    """
    import torch

    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        copied = memo.get(id(obj))
        if copied is None:
            tensor = obj.detach()
            copied = tensor.to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.clone()
            memo[id(obj)] = copied
        return copied
    if isinstance(obj, dict):
        return type(obj)((key, snapshot(value, memo)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        # Long lists of plain numbers need no walk, item by item.
        if all(type(item) in _PLAIN for item in obj):
            return list(obj) if isinstance(obj, list) else obj
        if isinstance(obj, list):
            return [snapshot(item, memo) for item in obj]
        return tuple(snapshot(item, memo) for item in obj)
    return obj


_PLAIN = (int, float, str, bool, type(None))


class _BackgroundWriter:
    """Runs one write at a time off the training thread and keeps its error.

    One thread lives for the whole fit and takes jobs from a queue: starting a
    thread per save cost about half a millisecond of the training thread's time.
    The thread is not a daemon, so an interpreter that is shutting down waits for
    a write in flight instead of abandoning it; ``close`` (called in ``teardown``)
    ends it.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None], what: str) -> None:
        self.wait()
        self._what = what
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, name="hooktrain-checkpoint-writer", daemon=False
            )
            self._thread.start()
        self._idle.clear()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # kept and raised on the training thread
                self._error = exc
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error if it failed."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointWriteError(
                f"writing checkpoint {self._what} failed: {type(error).__name__}: {error}"
            ) from error

    def close(self) -> None:
        """Wait for the write in flight, then end the thread; raise a write error."""
        thread, self._thread = self._thread, None
        try:
            self.wait()
        finally:
            if thread is not None:
                self._jobs.put(None)
                thread.join()


class ModelCheckpoint:
    """Saves checkpoints atomically and resumes from them exactly.

    Options carry the names Lightning users know.

    :param dirpath: the directory the checkpoints go to (created when needed).
    :param filename: the name pattern of top-k checkpoints, without ``.ckpt``;
        ``{epoch}``, ``{step}`` and any metric name, with an optional format
        (``"{epoch}-{val_loss:.3f}"`` gives ``epoch=2-val_loss=0.123.ckpt``).
    :param monitor: the metric that ranks checkpoints; ``None`` ranks by recency.
    :param mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
    :param save_top_k: how many ranked checkpoints to keep; ``-1`` keeps every
        one, ``0`` none (only ``last``).
    :param save_last: always keep ``last.ckpt``, the newest state (and save the
        final state when ``fit`` ends).
    :param every_n_train_steps: save every N optimizer steps (mid-epoch included).
        Only then does the plugin implement ``on_train_batch_end`` (the object is
        then of a subclass); without it, it adds no call per step. Fixed when the
        object is built: setting the attribute later does not add the hook.
    :param every_n_epochs: save at the end of every N-th epoch; the default is 1
        when ``every_n_train_steps`` is not set either.
    :param async_save: copy the state on the training thread and write it on a
        background thread; ``False`` writes before training continues.
    :param save_on_sigterm: on SIGTERM, save at the next batch boundary and stop.
    :param verbose: print where each checkpoint went (on rank 0).
    """

    name = "checkpoint"

    def __new__(cls, *args: Any, **kwargs: Any) -> ModelCheckpoint:
        # pluggy collects hook implementations from the object's attributes when it
        # is registered, and any on_train_batch_end implementation makes the core
        # call through pluggy on every batch and leave its plugin-free batch loop
        # (2-3% of a small step). Only step-wise saving needs that hook, so it lives
        # in a subclass, which constructing ModelCheckpoint picks when
        # every_n_train_steps is given: by name, entry point or class alike.
        if cls is ModelCheckpoint:
            try:
                bound = _INIT_SIGNATURE.bind(None, *args, **kwargs)
            except TypeError:
                pass  # __init__ raises it, with Python's own message
            else:
                if bound.arguments.get("every_n_train_steps") is not None:
                    cls = _StepwiseModelCheckpoint
        return super().__new__(cls)

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
        if mode not in ("min", "max"):
            raise ConfigurationError(f"checkpoint: mode must be 'min' or 'max', not {mode!r}")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigurationError(
                f"checkpoint: save_top_k must be an integer >= -1, got {save_top_k!r}"
            )
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
        self.dirpath = Path(dirpath)
        self.filename = filename or "{epoch}-{step}"
        if not self.filename or "/" in self.filename or os.sep in self.filename:
            raise ConfigurationError(
                f"checkpoint: filename must be a plain name pattern, got {filename!r}"
            )
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
        self._writer = _BackgroundWriter()
        self._sequence = 0
        self._saved_progress: tuple[Any, ...] | None = None
        self._sigterm = False
        self._previous_handler: Any = None
        self._handler_installed = False
        self._trainer: Trainer | None = None
        self._inside_epoch = False
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
        """Block until the checkpoint being written (if any) is on disk; raise if
        writing it failed."""
        self._writer.wait()

    # ------------------------------------------------------------------ hooks: setup

    @hookimpl
    def setup(self, trainer: Trainer, stage: str) -> None:
        if stage != "fit":
            return
        self._sigterm = False
        self._inside_epoch = False
        self._inline = None
        self.interrupted = False
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handler_installed = True

    @hookimpl(wrapper=True)
    def teardown(self, trainer: Trainer, stage: str) -> Generator[None, None, None]:
        # A wrapper: the wait for the last write comes after every other plugin's
        # teardown (closing event files and bars), whatever the plugin order, so it
        # overlaps them; and it runs even when one of them raises.
        try:
            return (yield)
        finally:
            if stage == "fit":
                self._end_fit()

    def _end_fit(self) -> None:
        try:
            # A run never ends with a write in flight, even when it failed.
            self._writer.close()
        finally:
            if self._handler_installed:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._handler_installed = False
                self._previous_handler = None
            self._trainer = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # No save here: the handler runs between two bytecodes of the training
        # thread, anywhere. It asks the core to stop, which the core honours after
        # an optimizer step (agreed between processes), and on_fit_end saves there.
        # That needs no hook per step from this plugin.
        self._sigterm = True
        trainer = self._trainer
        if trainer is None:
            return
        if trainer.world_size <= 1 or self._inside_epoch:
            trainer.should_stop = True
        # Else (several processes, outside an epoch's batches): the core agrees on
        # should_stop after optimizer steps and once after each epoch's end, but a
        # signal landing after that agreement would be read by this process alone,
        # splitting the processes. The flag is agreed on at the next epoch start or
        # end, or fit end, whichever comes first.

    def _remove_stale_temporaries(self) -> None:
        # Temporaries are named .<name>.<host>.<pid>.<thread>.<n>.tmp; one whose
        # process on this host is gone was left by a killed run.
        host = socket.gethostname().replace(".", "_")
        for temp in self.dirpath.glob(".*.tmp"):
            parts = temp.name.rsplit(".", 5)
            if len(parts) != 6 or parts[1] != host or not parts[2].isdigit():
                continue
            pid = int(parts[2])
            if pid == os.getpid() or _process_alive(pid):
                continue
            temp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ hooks: saving

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self.save_on_sigterm and trainer.world_size > 1:
            # From here to the epoch's end the core agrees on should_stop after every
            # optimizer step, so the handler may set it directly (set first, so a
            # signal between the two lines is not lost).
            self._inside_epoch = True
            if self._sigterm_agreed(trainer):
                trainer.should_stop = True

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.save_on_sigterm and trainer.world_size > 1:
            # A signal since the epoch's last optimizer step reached this process
            # only; agree on it before the core decides whether to go on.
            self._inside_epoch = False
            if self._sigterm_agreed(trainer):
                trainer.should_stop = True
        # A save that is due happens even when a SIGTERM stops the run after this
        # epoch; on_fit_end then finds the state saved and only reports.
        every = self.every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0:
            self._save(trainer, ranked=True)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        # Every process reaches fit end once, so agreeing here is a balanced
        # collective: all of them take the same path below (dump_checkpoint may run
        # collectives of its own), and only rank 0 writes.
        if self.save_on_sigterm and trainer.world_size > 1:
            self._inside_epoch = False
            self._sigterm_agreed(trainer)
        if self.save_on_sigterm and self._sigterm:
            self._stop_on_sigterm(trainer)
            return
        # The final state is saved too, so that rerunning a finished command with
        # ckpt_path="last" finds nothing left to do.
        if (
            self.save_last
            and trainer.sync_gradients
            and self._progress(trainer) != self._saved_progress
        ):
            self._save(trainer, ranked=False)
        # No wait here: teardown waits, so the last write overlaps the other
        # plugins' fit end and teardown (closing event files, bars).

    @hookimpl
    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        if self._loaded_from is not None and isinstance(exception, ConfigurationError):
            exception.add_note(f"hooktrain-checkpoint: while restoring {self._loaded_from}")

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self._loaded_from = None

    def _sigterm_agreed(self, trainer: Trainer) -> bool:
        """Whether any process received SIGTERM (a collective: every process calls it
        at the same point)."""
        import torch

        flag = torch.tensor([1.0 if self._sigterm else 0.0], device=trainer.device)
        self._sigterm = bool(trainer.all_reduce(flag).item() > 0)
        return self._sigterm

    def _stop_on_sigterm(self, trainer: Trainer) -> None:
        # The loop has stopped (after an optimizer step, so no half-accumulated
        # gradients) or finished: save that state unless it is saved already, and
        # wait for it, since the scheduler may kill the process soon after.
        if self._progress(trainer) != self._saved_progress:
            self._save(trainer, ranked=False)
        self._writer.wait()
        trainer.should_stop = True
        self.interrupted = True
        if trainer.is_global_zero:
            print(
                f"hooktrain-checkpoint: SIGTERM received; saved {self.last_model_path} at epoch "
                f"{trainer.current_epoch}, global step {trainer.global_step} and stopped. Run "
                f"the same command with ckpt_path='last' to continue.",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ saving

    @staticmethod
    def _progress(trainer: Trainer) -> tuple[Any, ...]:
        return (
            trainer.current_epoch,
            trainer.global_step,
            trainer.epoch_batches_done,
            trainer.epoch_complete,
        )

    def _score(self, trainer: Trainer) -> float | None:
        if self.monitor is None:
            return float(trainer.global_step)
        metrics = trainer.metrics
        if self.monitor not in metrics:
            # A validation metric is absent until validation first runs; only when
            # others of its kind exist is its absence worth a word (a typo, mostly).
            prefix = "val_" if self.monitor.startswith("val_") else ""
            kind_exists = any(name.startswith(prefix) for name in metrics)
            if kind_exists and not self._warned_monitor and trainer.is_global_zero:
                self._warned_monitor = True
                import difflib

                close = difflib.get_close_matches(self.monitor, list(metrics), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                print(
                    f"hooktrain-checkpoint: monitored metric {self.monitor!r} does not exist "
                    f"at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoints "
                    f"are not ranked until it does (last is still saved).{hint} Known metrics: "
                    f"{', '.join(sorted(metrics)) or 'none'}",
                    file=sys.stderr,
                )
            return None
        return float(metrics[self.monitor])

    def _better(self, a: float, b: float) -> bool:
        # NaN is never better than anything: a diverged run must not evict good files.
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a < b if self._effective_mode() == "min" else a > b

    def _effective_mode(self) -> str:
        return "max" if self.monitor is None else self.mode

    def _ranked(self) -> list[str]:
        """Names in ``best_k_models``, best first."""
        reverse = self._effective_mode() == "max"
        nan_last = [n for n, s in self.best_k_models.items() if math.isnan(s)]
        finite = sorted(
            (n for n, s in self.best_k_models.items() if not math.isnan(s)),
            key=lambda n: self.best_k_models[n],
            reverse=reverse,
        )
        return finite + nan_last

    def format_name(self, trainer: Trainer) -> str:
        """The file name (with ``.ckpt``) that ``filename`` gives for the current state."""
        values: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}

        def render(match: re.Match[str]) -> str:
            key, spec = match.group(1).strip(), match.group(2)
            value: Any = values.get(key)
            if value is None and key in trainer.metrics:
                value = trainer.metrics[key]
            if value is None:
                text = "none"  # a metric that does not exist yet at this save
            elif spec:
                text = format(value, spec)
            else:
                text = str(value)
            return f"{key.replace('/', '_')}={text}"

        name = _FIELD.sub(render, self.filename)
        if name == LAST_NAME:
            name += "-ranked"
        return name + storage.SUFFIX

    def _save(self, trainer: Trainer, *, ranked: bool) -> None:
        started = time.perf_counter()
        self._writer.wait()  # one write at a time; surfaces the previous one's error
        waited = time.perf_counter() - started
        ranked_name: str | None = None
        evicted: list[str] = []
        if ranked and self.save_top_k != 0:
            score = self._score(trainer)
            if score is not None:
                ranked_name, evicted = self._rank(self.format_name(trainer), score)
        self._sequence += 1
        self._saved_progress = self._progress(trainer)
        # Every process builds the checkpoint, whatever it decided about ranking:
        # plugins' on_save_checkpoint may run collectives. Only rank 0 writes.
        checkpoint = trainer.dump_checkpoint()
        if ranked_name is None and not self.save_last:
            return
        target = self.dirpath / ranked_name if ranked_name else self.last_path
        self.last_model_path = self.last_path if self.save_last else target
        if not trainer.is_global_zero:
            return
        progress = checkpoint["progress"]
        record = {
            "epoch": int(progress["epoch"]),
            "global_step": int(progress["global_step"]),
            "epoch_batches_done": int(progress["epoch_batches_done"]),
            "epoch_complete": bool(progress["epoch_complete"]),
            "sequence": self._sequence,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "hooktrain_version": checkpoint.get("hooktrain_version"),
        }
        paths = [str(target)] + ([str(self.last_path)] if ranked_name and self.save_last else [])
        if self.async_save and self._encodes_inline(trainer):
            # A small state is encoded here, on the training thread (well under a
            # millisecond for a small model), leaving the writer only system calls,
            # during which it does not hold the interpreter lock. Pickled on the
            # writer thread instead, the same state slowed training down by more
            # than its own encoding time, contending for the lock.
            encoded: bytes | None = storage.encode(checkpoint, record)
            state = None
        else:
            encoded = None
            state = snapshot(checkpoint)

        def job() -> None:
            begun = time.perf_counter()
            linking = ranked_name is not None and self.save_last
            # With a link to follow, one directory fsync after both renames covers both.
            if encoded is not None:
                storage.write_encoded(encoded, target, sync_directory=not linking)
            else:
                storage.write_file(state, target, record, sync_directory=not linking)
            if linking:
                storage.link_or_copy(target, self.last_path)
            # Evicted files go only once their replacement is complete.
            for name in evicted:
                if name != ranked_name:
                    (self.dirpath / name).unlink(missing_ok=True)
            self.write_costs.append(time.perf_counter() - begun)
            if self.verbose:
                print(f"hooktrain-checkpoint: saved {' and '.join(paths)}", file=sys.stderr)

        if self.async_save:
            self._writer.submit(job, " and ".join(paths))
        else:
            job()
        self.save_costs.append(time.perf_counter() - started)
        self.wait_costs.append(waited)

    def _encodes_inline(self, trainer: Trainer) -> bool:
        """Whether this fit's checkpoints are small enough to encode on the training
        thread: judged once per fit from the model's size (optimizer state is about
        the same again, or twice for Adam)."""
        if self._inline is None:
            parameter_bytes = sum(p.nbytes for p in trainer.module.parameters())
            self._inline = 3 * parameter_bytes <= INLINE_ENCODE_LIMIT
        return self._inline

    def _rank(self, name: str, score: float) -> tuple[str | None, list[str]]:
        """Enter ``name`` into the top k if it belongs there: ``(name or None, evicted)``."""
        best = self.best_k_models
        if name in best or self.save_top_k == -1 or len(best) < self.save_top_k:
            best[name] = score
        else:
            worst = self._ranked()[-1]
            if not self._better(score, best[worst]):
                return None, []
            best[name] = score
        evicted: list[str] = []
        if self.save_top_k != -1:
            while len(best) > self.save_top_k:
                worst = self._ranked()[-1]
                del best[worst]
                evicted.append(worst)
        return name, evicted

    # ------------------------------------------------------------------ hooks: state

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"][self._own_name(trainer)] = {
            "dirpath": str(self.dirpath),
            "monitor": self.monitor,
            "mode": self.mode,
            "best_k_models": dict(self.best_k_models),
            "sequence": self._sequence,
        }

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        state = checkpoint.get("plugins", {}).get(self._own_name(trainer))
        if state:
            self._sequence = int(state.get("sequence", 0))
            same_ranking = state.get("monitor") == self.monitor and state.get("mode") == self.mode
            if same_ranking:
                # Files removed since (by hand, or by a later run) are forgotten.
                self.best_k_models = {
                    name: float(score)
                    for name, score in state.get("best_k_models", {}).items()
                    if (self.dirpath / name).is_file()
                }
        progress = checkpoint["progress"]
        self._saved_progress = (
            int(progress["epoch"]),
            int(progress["global_step"]),
            int(progress["epoch_batches_done"]),
            bool(progress["epoch_complete"]),
        )
        if trainer.is_global_zero:
            self._report_differences(trainer, checkpoint)

    def _report_differences(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        saved_plugins = list(checkpoint.get("plugin_list", []))
        fresh = [
            name
            for name in trainer.plugin_names
            if name not in saved_plugins and name not in checkpoint.get("plugins", {})
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

    def _own_name(self, trainer: Trainer) -> str:
        return trainer.plugin_manager.get_name(self) or self.name

    # ------------------------------------------------------------------ hooks: loading

    @hookimpl
    def load_checkpoint(self, trainer: Trainer, ckpt_path: str) -> Mapping[str, Any] | None:
        say = trainer.is_global_zero
        path = Path(ckpt_path)
        if ckpt_path == LAST_NAME or path.is_dir():
            directory = self.dirpath if ckpt_path == LAST_NAME else path
            found = newest_checkpoint(directory, report=_stderr if say else None)
            if found is None:
                if say:
                    print(
                        f"hooktrain-checkpoint: no complete checkpoint in {directory}; "
                        f"starting fresh",
                        file=sys.stderr,
                    )
                return {}
            checkpoint, info = found
            self._loaded_from = os.fspath(info.path)
        else:
            checkpoint, info = storage.load_file(path)
            self._loaded_from = os.fspath(path)
            if info is None and say:
                print(
                    f"hooktrain-checkpoint: {path} has no integrity record (not written by "
                    f"this plugin); loaded without verification",
                    file=sys.stderr,
                )
        if say:
            progress = checkpoint["progress"]
            print(
                f"hooktrain-checkpoint: resuming from {self._loaded_from} (epoch "
                f"{progress['epoch']}, global step {progress['global_step']})",
                file=sys.stderr,
            )
        return checkpoint


class _StepwiseModelCheckpoint(ModelCheckpoint):
    """A :class:`ModelCheckpoint` with ``every_n_train_steps``: the only kind that
    looks at every batch. ``ModelCheckpoint(every_n_train_steps=N)`` returns one."""

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        # Gradients of a half-accumulated window are not in a checkpoint, so only
        # a batch that completed an optimizer step is a consistent place to save.
        every = self.every_n_train_steps
        if every is None or not trainer.sync_gradients:
            return
        if trainer.global_step % every == 0 and trainer.global_step > 0:
            self._save(trainer, ranked=True)


_INIT_SIGNATURE = inspect.signature(ModelCheckpoint.__init__)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_checkpoints(
    directory: str | os.PathLike[str], report: Callable[[str], None] | None = None
) -> list[storage.CheckpointInfo]:
    """Every checkpoint with a readable record in ``directory``, newest first.

    Files whose record is missing or unreadable are passed to ``report`` by name.
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
                report(f"hooktrain-checkpoint: skipping {exc}")
        except OSError as exc:
            if report is not None:
                report(f"hooktrain-checkpoint: skipping {path}: {exc}")
    # Newest first; between equal states (last.ckpt and the ranked file it links
    # to) prefer last.ckpt.
    found.sort(key=lambda i: (i.progress_key, i.path.stem == LAST_NAME), reverse=True)
    return found


def newest_checkpoint(
    directory: str | os.PathLike[str], report: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], storage.CheckpointInfo] | None:
    """Load the newest complete, intact checkpoint of ``directory``.

    A damaged file (truncated, or its digest does not match) is passed to
    ``report`` by name and the next newest is tried. A file that safe loading
    refuses stops the search with :class:`~hooktrain_checkpoint.storage.UnsafeCheckpointError`:
    a planted file is not something to step around quietly.

    :return: ``(checkpoint, info)``, or ``None`` when no intact checkpoint exists.
    """
    for info in list_checkpoints(directory, report):
        try:
            checkpoint, _ = storage.load_file(info.path, require_record=True)
        except storage.DamagedCheckpointError as exc:
            if report is not None:
                report(f"hooktrain-checkpoint: skipping {exc}; trying an older one")
            continue
        return checkpoint, info
    return None
