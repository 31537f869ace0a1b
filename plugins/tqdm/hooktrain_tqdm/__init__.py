"""Progress bars for hooktrain, drawn with ``tqdm``.

What the user sees, on a terminal or in a notebook:

* one bar per training epoch (``epoch 2/5``) with the batch count, the speed and
  the latest published loss and metrics in its postfix;
* a validation bar under it while validation runs, removed when it ends;
* one summary line per epoch (``epoch 2/5: loss=0.31, acc=0.91, val_loss=0.29,
  val_acc=0.92 (100 batches, 1.2s)``) that stays on screen.

Where the output is not a terminal (CI logs, ``nohup``, a redirected stderr) no
bar is drawn: a plain progress line every ``plain_interval`` seconds at most, and
the same summary line per epoch. Nothing is ever written with a carriage return.

Per training batch the plugin reads a clock and compares it with the time of the
next redraw, like tqdm's own ``mininterval``; it draws only when that time has
come. The values in the postfix are those the trainer published through
``log_metrics`` (every ``log_every_n_steps``, already converted to floats for the
loggers), so the bar never makes the host wait for the device.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import IO, TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from tqdm import tqdm as Tqdm

    from hooktrain.trainer import Trainer

__all__ = ["ProgressBar"]
__version__ = "0.1.0"

#: The clock that decides when a redraw is due, in seconds. Read through the module
#: at each call, so a test can replace it with one it advances by hand.
_clock = time.perf_counter

_NEVER = math.inf


class ProgressBar:
    """A hooktrain plugin drawing progress bars (entry-point name ``tqdm``).

    :param refresh_interval: a bar is redrawn at a batch's end when at least this
        many seconds passed since its previous redraw; ``0`` redraws after every
        batch. Raises ``ConfigurationError`` (a ``ValueError``) when negative.
    :param leave: keep each epoch's bar on screen when the epoch ends (the summary
        line is printed either way). The validation bar is always removed.
    :param stream: where to draw; default ``sys.stderr`` as it is when the stage
        starts.
    :param plain_interval: where ``stream`` is not a terminal, print a plain progress
        line at a batch's end when at least this many seconds passed since the
        previous one (or the epoch's start); ``None`` prints only the summary line per
        epoch. Raises ``ConfigurationError`` (a ``ValueError``) unless positive or ``None``.
    :param metrics: names to show in the postfix and the summary, in this order;
        default every published value, training's before validation's, each
        stage's loss first. Raises ``ConfigurationError``
        (a ``ValueError``) for a single string.
    :param terminal: force the terminal (``True``) or plain (``False``) behaviour
        instead of asking ``stream.isatty()``.
    :param show_validation: draw a bar during validation, test and predict.
    :param redirect_logging: while bars are drawn, route console ``logging``
        handlers of the root logger through ``tqdm.write`` so log lines do not
        break the bar.
    """

    #: Registered under this name when passed as an object.
    name = "tqdm"
    # Two bars redrawing one terminal line garble each other (Lightning refuses a
    # second progress bar for the same reason): a second progress-bar plugin is
    # refused when the Trainer is built.
    exclusive_roles = ("progress-bar",)

    def __init__(
        self,
        *,
        refresh_interval: float = 0.1,
        leave: bool = False,
        stream: IO[str] | None = None,
        plain_interval: float | None = 30.0,
        metrics: Sequence[str] | None = None,
        terminal: bool | None = None,
        show_validation: bool = True,
        redirect_logging: bool = True,
    ) -> None:
        if not refresh_interval >= 0:
            raise ConfigurationError(
                f"tqdm: refresh_interval must be >= 0 seconds, got {refresh_interval!r}"
            )
        if plain_interval is not None and not plain_interval > 0:
            raise ConfigurationError(
                f"tqdm: plain_interval must be > 0 seconds or None, got {plain_interval!r}"
            )
        if isinstance(metrics, str):
            raise ConfigurationError(
                f"tqdm: metrics must be a list of names, got the string {metrics!r}"
            )
        self.refresh_interval = float(refresh_interval)
        self.leave = leave
        self.stream = stream
        self.plain_interval = plain_interval
        self.metrics = list(metrics) if metrics is not None else None
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
        # (columns, rows) to draw in, where the terminal reports no usable size.
        self._fixed_size: tuple[int, int] | None = None
        self._redirect = ExitStack()
        self._bar: Tqdm | None = None
        self._eval_bar: Tqdm | None = None
        # Clock readings at which the next redraw is due; _NEVER when none is.
        self._next = _NEVER
        self._eval_next = _NEVER
        self._interval = _NEVER
        self._latest: dict[str, float] = {}
        self._val_values: dict[str, float] = {}
        self._epoch_started = 0.0
        self._epoch_first_batch = 0
        self._eval_offsets: list[int] = []

    # ------------------------------------------------------------------ stage

    def _begin(self, trainer: Trainer) -> None:
        if self._begun:
            return
        self._begun = True
        self._active = trainer.is_global_zero
        self._out = self.stream if self.stream is not None else sys.stderr
        self._latest = {}
        if not self._active:
            return
        from tqdm.auto import tqdm as auto_tqdm

        class Bar(auto_tqdm):  # type: ignore[misc, valid-type]
            # tqdm's monitor thread adjusts redraw intervals; the plugin decides
            # when to redraw itself, and a thread would only cost time.
            monitor_interval = 0

        self._tqdm = Bar
        # A notebook's stderr is no terminal, yet its widget bars are the right thing.
        in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)
        if self.terminal is not None:
            self._interactive = self.terminal
        else:
            self._interactive = in_notebook or _isatty(self._out)
        # A terminal that reports zero columns or zero rows (a pty nobody sized, some
        # container consoles) makes tqdm draw nothing at all, and tqdm reads the size
        # again at each redraw when it follows resizes; draw 80 x 24 there, fixed.
        size = _terminal_size(self._out) if self._interactive else None
        if size is not None and 0 in size:
            self._fixed_size = (size.columns or 80, size.lines or 24)
        else:
            self._fixed_size = None
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
        """Close any bar left open (stopped mid-epoch, or an exception) and restore
        logging, so a traceback printed afterwards starts on a clean line."""
        self._close_bars()
        self._redirect.close()
        self._begun = False
        self._active = False

    def _close_bars(self) -> None:
        for bar in (self._eval_bar, self._bar):
            if bar is not None:
                bar.close()
        self._eval_bar = self._bar = None
        self._next = self._eval_next = _NEVER

    # ------------------------------------------------------------------ training

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self._begin(trainer)
        if not self._active:
            return
        self._val_values = {}
        self._epoch_started = _clock()
        self._epoch_first_batch = trainer.epoch_batches_done
        if self._interactive:
            if self._bar is not None:
                self._bar.close()
            self._bar = self._new_bar(
                total=trainer.num_training_batches,
                initial=trainer.epoch_batches_done,
                desc=_epoch_label(trainer),
                leave=self.leave,
            )
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._interval = self.refresh_interval
        else:
            self._interval = self.plain_interval if self.plain_interval else _NEVER
        self._next = self._epoch_started + self._interval

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        # The whole per-step cost when no redraw is due: one clock reading.
        now = _clock()
        if now < self._next:
            return
        self._next = now + self._interval
        done = trainer.epoch_batches_done
        bar = self._bar
        if bar is not None:
            bar.update(done - bar.n)
        else:
            self._print(self._plain_progress(trainer, done, now))

    def _plain_progress(self, trainer: Trainer, done: int, now: float) -> str:
        total = trainer.num_training_batches
        elapsed = now - self._epoch_started
        rate = (done - self._epoch_first_batch) / elapsed if elapsed > 0 else 0.0
        where = f"{done}/{total} batches ({100 * done // total}%)" if total else f"{done} batches"
        line = f"{_epoch_label(trainer)}: {where}, {rate:.3g} batches/s"
        postfix = self._postfix()
        return f"{line}, {postfix}" if postfix else line

    # ------------------------------------------------------------------ published values

    @hookimpl
    def log_metrics(
        self, trainer: Trainer, metrics: Mapping[str, float], step: int, scope: str
    ) -> None:
        """Keep the published floats for the next redraw (free: the trainer already
        converted them for every logger) and print the summary lines."""
        if not self._active:
            return
        if scope == "step" or (scope == "validate" and trainer.stage == "fit"):
            if scope == "validate":
                self._val_values.update(metrics)
            self._latest.update(metrics)
            if self._bar is not None:
                # Shown from the next redraw on; drawing now would bypass the throttle.
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif scope == "epoch":
            self._end_epoch(trainer, metrics)
        elif scope in ("validate", "test"):
            self._print(f"{scope}: {_format_values(self._select(metrics))}")

    def _end_epoch(self, trainer: Trainer, means: Mapping[str, float]) -> None:
        text = _format_values(self._select({**means, **self._val_values}))
        bar = self._bar
        if bar is not None:
            # The bar's last frame shows the epoch means, like the summary line.
            bar.set_postfix_str(text, refresh=False)
            bar.update(trainer.epoch_batches_done - bar.n)
            bar.close()
            self._bar = None
        self._next = _NEVER
        batches = trainer.epoch_batches_done - self._epoch_first_batch
        seconds = _clock() - self._epoch_started
        self._print(f"{_epoch_label(trainer)}: {text} ({batches} batches, {seconds:.1f}s)")

    def _postfix(self) -> str:
        return _format_values(self._select(self._latest))

    def _select(self, values: Mapping[str, float]) -> dict[str, float]:
        if self.metrics is not None:
            return {name: values[name] for name in self.metrics if name in values}
        # Values arrive in name order (val_acc before val_loss): shown training's
        # first, then validation's, each stage's loss ahead of its metrics.
        return dict(sorted(values.items(), key=lambda item: _display_rank(item[0])))

    def _print(self, line: str) -> None:
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
        lengths = trainer.num_eval_batches
        total: int | None = None
        # Batch indices restart with each dataloader; offsets turn them into one count.
        self._eval_offsets = [0] * len(lengths)
        if all(n is not None for n in lengths):
            known: list[int] = lengths  # type: ignore[assignment]
            self._eval_offsets = [0, *itertools.accumulate(known[:-1])]
            total = sum(known)
        self._eval_bar = self._new_bar(total=total, initial=0, desc=label, leave=False)
        self._eval_next = _clock() + self.refresh_interval

    def _eval_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        now = _clock()
        bar = self._eval_bar
        if now < self._eval_next or bar is None:
            return
        self._eval_next = now + self.refresh_interval
        offsets = self._eval_offsets
        done = (offsets[dataloader_idx] if dataloader_idx < len(offsets) else 0) + batch_idx + 1
        if done > bar.n:
            bar.update(done - bar.n)

    def _end_eval(self) -> None:
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
        self._eval_batch_end(batch_idx, dataloader_idx)

    @hookimpl
    def on_test_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
        self._eval_batch_end(batch_idx, dataloader_idx)

    @hookimpl
    def on_predict_batch_end(self, batch_idx: int, dataloader_idx: int) -> None:
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
        fixed = self._fixed_size
        return self._tqdm(
            total=total,
            initial=initial,
            desc=desc,
            leave=leave,
            file=self._out,
            unit="batch",
            ncols=fixed[0] if fixed else None,
            nrows=fixed[1] if fixed else None,
            dynamic_ncols=fixed is None,
            # The plugin decides when to redraw; tqdm must draw whenever asked.
            mininterval=0,
            miniters=1,
        )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _terminal_size(stream: Any) -> os.terminal_size | None:
    try:
        return os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _has_console_handler() -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )


def _epoch_label(trainer: Trainer) -> str:
    return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"


def _display_rank(name: str) -> tuple[int, bool]:
    stage = 1 if name.startswith("val_") else 2 if name.startswith("test_") else 0
    metric = name.split("/")[0].removeprefix("val_").removeprefix("test_")  # per loader too
    return stage, metric != "loss"


def _format_values(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in values.items())
