"""Progress bars for hooktrain, drawn with ``tqdm``.

What the user sees, on a terminal or in a notebook:

* one bar per training epoch (``epoch 2/5``) with the batch count, the speed and
  the latest loss and metrics in its postfix;
* a validation bar under it while validation runs, removed when it ends;
* one summary line per epoch (``epoch 2/5: loss=0.31, acc=0.91, val_loss=0.29,
  val_acc=0.92 (100 batches, 1.2s)``) that stays on screen.

Where the output is not a terminal (CI logs, ``nohup``, a redirected stderr) no
bar is drawn: a plain progress line every ``plain_interval`` seconds at most, and
the same summary line per epoch. Nothing is ever written with a carriage return.

The training bar costs nothing per batch: the plugin implements no per-step hook
(which would also send the trainer off its lean batch loop, about 2% of a small
model's step). A timer thread redraws it when a redraw is due, reading the
trainer's batch count; it sleeps in between, so the bar also keeps ticking (the
elapsed time) during one long step. Values in the postfix are those the trainer
last published (at every ``log_every_n_steps``, already converted to floats for
the loggers), so drawing the bar forces no device sync; only when nothing was
published for ``stale_after`` seconds (very slow steps) does a redraw read the
latest loss itself, which costs one sync per redraw, never one per step.
Validation, test and predict bars are updated from their batch-end hooks.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from time import perf_counter
from typing import IO, TYPE_CHECKING, Any

from hooktrain import hookimpl

if TYPE_CHECKING:
    from tqdm import tqdm as Tqdm

    from hooktrain.trainer import Trainer

__all__ = ["ProgressBar"]
__version__ = "0.1.0"

_NEVER = math.inf


class ProgressBar:
    """A hooktrain plugin drawing progress bars (entry-point name ``tqdm``).

    :param refresh_interval: seconds between two redraws of a bar on a terminal or
        in a notebook (at least 0.005 s for the training bar, which a timer thread
        redraws).
    :param leave: keep each epoch's bar on screen when the epoch ends (the summary
        line is printed either way). The validation bar is always removed.
    :param stream: where to draw; default ``sys.stderr`` as it is when the stage
        starts.
    :param plain_interval: where ``stream`` is not a terminal, print a plain progress
        line every this many seconds during an epoch (at least 0.005 s); ``None``
        prints only the summary line per epoch.
    :param metrics: names to show in the postfix and the summary, in this order;
        default every published value, ``loss`` first.
    :param stale_after: when nothing was published for this many seconds (steps
        slower than ``log_every_n_steps`` allows), a redraw reads the current
        values itself (one device sync per redraw). ``None``: never.
    :param terminal: force the terminal (``True``) or plain (``False``) behaviour
        instead of asking ``stream.isatty()``.
    :param show_validation: draw a bar during validation, test and predict.
    :param redirect_logging: while bars are drawn, route console ``logging``
        handlers of the root logger through ``tqdm.write`` so log lines do not
        break the bar.
    """

    #: Registered under this name when passed as an object.
    name = "tqdm"

    def __init__(
        self,
        *,
        refresh_interval: float = 0.1,
        leave: bool = False,
        stream: IO[str] | None = None,
        plain_interval: float | None = 30.0,
        metrics: Sequence[str] | None = None,
        stale_after: float | None = 2.0,
        terminal: bool | None = None,
        show_validation: bool = True,
        redirect_logging: bool = True,
    ) -> None:
        if not refresh_interval >= 0:
            raise ValueError(f"refresh_interval must be >= 0 seconds, got {refresh_interval!r}")
        if plain_interval is not None and not plain_interval > 0:
            raise ValueError(f"plain_interval must be > 0 seconds or None, got {plain_interval!r}")
        if stale_after is not None and not stale_after >= 0:
            raise ValueError(f"stale_after must be >= 0 seconds or None, got {stale_after!r}")
        if isinstance(metrics, str):
            raise ValueError(f"metrics must be a list of names, got the string {metrics!r}")
        self.refresh_interval = float(refresh_interval)
        self.leave = leave
        self.stream = stream
        self.plain_interval = plain_interval
        self.metrics = list(metrics) if metrics is not None else None
        self.stale_after = stale_after
        self.terminal = terminal
        self.show_validation = show_validation
        self.redirect_logging = redirect_logging

        # Per-stage state, set when the stage's first hook after setup runs (the
        # process rank is final only once every setup hook has run).
        self._begun = False
        self._active = False
        self._interactive = False
        self._out: IO[str] = sys.stderr
        self._tqdm: type[Tqdm] | None = None
        self._ncols: int | None = None
        self._redirect = ExitStack()
        self._bar: Tqdm | None = None
        self._eval_bar: Tqdm | None = None
        # perf_counter() value at which the next redraw is due; inf when none is.
        self._next = _NEVER
        self._eval_next = _NEVER
        self._latest: dict[str, float] = {}
        self._val_values: dict[str, float] = {}
        self._fresh_at = 0.0
        self._epoch_started = 0.0
        self._epoch_first_batch = 0
        self._epoch_total: int | None = None
        self._eval_offsets: list[int] = []
        # The timer thread that redraws the training bar, and what it shares with
        # the training thread: every access to bars and deadlines holds the lock.
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._timer: threading.Thread | None = None
        self._stopping = False
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------ stage

    def _begin(self, trainer: Trainer) -> None:
        if self._begun:
            return
        self._begun = True
        self._active = trainer.is_global_zero
        self._out = self.stream if self.stream is not None else sys.stderr
        self._latest = {}
        self._fresh_at = perf_counter()
        if not self._active:
            return
        self._trainer = trainer
        from tqdm.auto import tqdm as auto_tqdm

        class Bar(auto_tqdm):  # type: ignore[misc, valid-type]
            # tqdm's monitor thread exists to adjust redraw intervals; the plugin
            # schedules redraws itself, and starting that thread for every
            # epoch's bar costs more than all the redraws of a short epoch.
            monitor_interval = 0

        self._tqdm = Bar
        # A notebook's stderr is no terminal, yet its widget bars are the right thing.
        in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)
        if self.terminal is not None:
            self._interactive = self.terminal
        else:
            self._interactive = in_notebook or _isatty(self._out)
        # A terminal that reports zero columns (a pty nobody sized, some container
        # consoles) makes tqdm draw nothing at all; draw 80 columns wide there.
        self._ncols = 80 if self._interactive and _columns(self._out) == 0 else None
        if self._interactive and self.redirect_logging and _has_console_handler():
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=auto_tqdm))

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        self._begin(trainer)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        self._close_bars()

    @hookimpl
    def teardown(self, trainer: Trainer) -> None:
        """Stop the timer thread, close any bar left open (stopped mid-epoch, or an
        exception) and restore logging, so a traceback printed afterwards starts on
        a clean line."""
        self._stop_timer()
        self._close_bars()
        self._redirect.close()
        self._begun = False
        self._active = False
        self._trainer = None
        self._next = self._eval_next = _NEVER

    def _close_bars(self) -> None:
        with self._lock:
            for bar in (self._eval_bar, self._bar):
                if bar is not None:
                    bar.close()
            self._eval_bar = self._bar = None

    # ------------------------------------------------------------------ timer thread

    def _schedule(self, deadline: float) -> None:
        """Set the training bar's next redraw (``_NEVER``: none) and tell the timer
        thread, starting it on first use."""
        with self._lock:
            self._next = deadline
            if deadline != _NEVER and self._timer is None:
                self._stopping = False
                self._timer = threading.Thread(
                    target=self._run_timer, name="hooktrain-tqdm", daemon=True
                )
                self._timer.start()
        self._wake.set()

    def _run_timer(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = perf_counter()
                if now >= self._next and self._trainer is not None:
                    try:
                        self._redraw(self._trainer)
                    except Exception:  # a bar must never take training down
                        self._next = _NEVER
                wait = None if self._next == _NEVER else max(0.0, self._next - perf_counter())
            self._wake.wait(wait)
            self._wake.clear()

    def _stop_timer(self) -> None:
        timer = self._timer
        if timer is None:
            return
        with self._lock:
            self._stopping = True
            self._next = _NEVER
        self._wake.set()
        timer.join()
        self._timer = None

    # ------------------------------------------------------------------ training

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self._begin(trainer)
        if not self._active:
            return
        with self._lock:
            now = perf_counter()
            self._val_values = {}
            self._epoch_started = now
            self._epoch_first_batch = trainer.epoch_batches_done
            self._epoch_total = _train_total(trainer)
            if self._interactive:
                if self._bar is not None:
                    self._bar.close()
                self._bar = self._new_bar(
                    total=self._epoch_total,
                    initial=trainer.epoch_batches_done,
                    desc=_epoch_label(trainer),
                    leave=self.leave,
                )
                deadline = now + _timer_interval(self.refresh_interval)
            elif self.plain_interval:
                deadline = now + _timer_interval(self.plain_interval)
            else:
                deadline = _NEVER
            self._schedule(deadline)

    def _redraw(self, trainer: Trainer) -> None:
        """Redraw the training bar (or print a plain progress line); called by the
        timer thread, holding the lock."""
        now = perf_counter()
        done = trainer.epoch_batches_done
        postfix = _format_values(self._current_values(trainer, now))
        bar = self._bar
        if bar is not None:
            bar.set_postfix_str(postfix, refresh=False)
            if done > bar.n:
                bar.update(done - bar.n)
            else:
                bar.refresh()
            self._next = now + _timer_interval(self.refresh_interval)
        elif self._active and not self._interactive and self.plain_interval:
            self._print(self._plain_progress(trainer, done, now, postfix))
            self._next = now + _timer_interval(self.plain_interval)
        else:
            self._next = _NEVER

    def _current_values(self, trainer: Trainer, now: float) -> dict[str, float]:
        if self.stale_after is not None and now - self._fresh_at > self.stale_after:
            # Nothing published for a while: read the latest values rather than show
            # a loss from long ago. From this thread, only a copy of what the loop
            # stored is read: converting it costs one sync per redraw.
            self._latest.update(trainer.metrics.snapshot_floats())
            self._fresh_at = now
        return self._select(self._latest)

    def _plain_progress(self, trainer: Trainer, done: int, now: float, postfix: str) -> str:
        total = self._epoch_total
        elapsed = now - self._epoch_started
        rate = (done - self._epoch_first_batch) / elapsed if elapsed > 0 else 0.0
        where = f"{done}/{total} batches ({100 * done // total}%)" if total else f"{done} batches"
        line = f"{_epoch_label(trainer)}: {where}, {rate:.3g} batches/s"
        return f"{line}, {postfix}" if postfix else line

    # ------------------------------------------------------------------ published values

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, float], scope: str) -> None:
        """Keep the published floats for the next redraw (free: the trainer already
        converted them for every logger) and print the summary lines."""
        if not self._active:
            return
        with self._lock:
            if scope == "step":
                self._latest.update(metrics)
                self._fresh_at = perf_counter()
            elif scope == "epoch":
                self._end_epoch(trainer, metrics)
            elif trainer.stage == "fit" and scope == "validate":
                self._val_values.update(metrics)
                self._latest.update(metrics)
            elif scope in ("validate", "test"):
                self._print(f"{scope}: {_format_values(self._select(metrics))}")

    def _end_epoch(self, trainer: Trainer, means: Mapping[str, float]) -> None:
        values = self._select({**means, **self._val_values})
        text = _format_values(values)
        bar = self._bar
        if bar is not None:
            # The bar's last frame shows the epoch means, like the summary line.
            bar.set_postfix_str(text, refresh=False)
            done = trainer.epoch_batches_done
            if done > bar.n:
                bar.update(done - bar.n)
            bar.close()
            self._bar = None
        self._next = _NEVER
        batches = trainer.epoch_batches_done - self._epoch_first_batch
        seconds = perf_counter() - self._epoch_started
        self._print(f"{_epoch_label(trainer)}: {text} ({batches} batches, {seconds:.1f}s)")

    def _select(self, values: Mapping[str, float]) -> dict[str, float]:
        if self.metrics is not None:
            return {name: values[name] for name in self.metrics if name in values}
        ordered = {"loss": values["loss"]} if "loss" in values else {}
        ordered.update(values)
        return ordered

    def _print(self, line: str) -> None:
        with self._lock:
            if self._interactive and self._tqdm is not None:
                # tqdm.write clears the open bars, prints, and draws them again below.
                self._tqdm.write(line, file=self._out)
            else:
                self._out.write(line + "\n")
                self._out.flush()

    # ------------------------------------------------------------------ evaluation

    def _start_eval(self, trainer: Trainer, label: str) -> None:
        self._begin(trainer)
        if not (self._active and self._interactive and self.show_validation):
            return
        lengths = _eval_lengths(trainer, trainer.eval_dataloaders, label)
        # Batch indices restart with each dataloader; offsets turn them into one count.
        self._eval_offsets = (
            [sum(lengths[:i]) for i in range(len(lengths))]
            if all(n is not None for n in lengths)
            else [0] * len(lengths)
        )
        total = sum(lengths) if all(n is not None for n in lengths) else None  # type: ignore[arg-type]
        with self._lock:
            self._eval_bar = self._new_bar(total=total, initial=0, desc=label, leave=False)
        self._eval_next = perf_counter() + self.refresh_interval

    def _eval_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        now = perf_counter()
        bar = self._eval_bar
        if bar is None:
            self._eval_next = _NEVER
            return
        offsets = self._eval_offsets
        done = (offsets[dataloader_idx] if dataloader_idx < len(offsets) else 0) + batch_idx + 1
        with self._lock:
            if done > bar.n:
                bar.update(done - bar.n)
        self._eval_next = now + self.refresh_interval

    def _end_eval(self) -> None:
        with self._lock:
            if self._eval_bar is not None:
                self._eval_bar.close()
                self._eval_bar = None
        self._eval_next = _NEVER

    @hookimpl
    def on_validation_start(self, trainer: Trainer) -> None:
        self._start_eval(trainer, "validate")

    @hookimpl
    def on_test_start(self, trainer: Trainer) -> None:
        self._start_eval(trainer, "test")

    @hookimpl
    def on_predict_start(self, trainer: Trainer) -> None:
        self._start_eval(trainer, "predict")

    @hookimpl
    def on_validation_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        if perf_counter() >= self._eval_next:
            self._eval_batch_end(batch_idx, dataloader_idx)

    @hookimpl
    def on_test_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        if perf_counter() >= self._eval_next:
            self._eval_batch_end(batch_idx, dataloader_idx)

    @hookimpl
    def on_predict_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        if perf_counter() >= self._eval_next:
            self._eval_batch_end(batch_idx, dataloader_idx)

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        self._end_eval()

    @hookimpl
    def on_test_end(self, trainer: Trainer) -> None:
        self._end_eval()

    @hookimpl
    def on_predict_end(self, trainer: Trainer) -> None:
        self._end_eval()

    # ------------------------------------------------------------------ helpers

    def _new_bar(self, *, total: int | None, initial: int, desc: str, leave: bool) -> Tqdm:
        assert self._tqdm is not None
        return self._tqdm(
            total=total,
            initial=initial,
            desc=desc,
            leave=leave,
            file=self._out,
            unit="batch",
            ncols=self._ncols,
            dynamic_ncols=self._ncols is None,
            # The plugin decides when to redraw; tqdm must draw whenever asked.
            mininterval=0,
            miniters=1,
        )


#: The timer thread's shortest interval: a zero interval would keep it spinning.
_MIN_TIMER_INTERVAL = 0.005


def _timer_interval(seconds: float) -> float:
    return max(seconds, _MIN_TIMER_INTERVAL)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _columns(stream: Any) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _has_console_handler() -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _train_total(trainer: Trainer) -> int | None:
    total = _length(trainer.train_dataloader)
    limit = getattr(trainer, "limits", {}).get("train")
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def _eval_lengths(trainer: Trainer, loaders: Iterable[Any], stage: str) -> list[int | None]:
    limit = getattr(trainer, "limits", {}).get(stage)
    lengths: list[int | None] = []
    for loader in loaders:
        length = _length(loader)
        if limit is not None:
            length = limit if length is None else min(length, limit)
        lengths.append(length)
    return lengths


def _epoch_label(trainer: Trainer) -> str:
    return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"


def _format_values(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in values.items())
