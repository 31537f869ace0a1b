"""What the bar writes, captured from real runs: on a pseudo-terminal, on a stream
that claims to be a terminal, and on plain files and redirected stderr."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path
from typing import Any

import hooktrain_tqdm
import pytest
import torch
import torch.nn.functional as F
from hooktrain_tqdm import ProgressBar

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data, make_model, run

NUMBER = r"-?[\d.]+(?:e[-+]\d+)?"
SUMMARY = re.compile(
    rf"^epoch (\d)/2: loss={NUMBER}, acc={NUMBER}, val_loss={NUMBER}, val_acc={NUMBER} "
    rf"\(8 batches, [\d.]+s\)$"
)


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, to capture every frame in memory."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    """Stands in for the plugin's clock: time moves only when a training batch ends,
    by ``seconds_per_batch``, so the number of redraws follows from the options alone."""

    name = "fake_clock"

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds_per_batch: float) -> None:
        self.now = 0.0
        self.seconds_per_batch = seconds_per_batch
        monkeypatch.setattr(hooktrain_tqdm, "_clock", lambda: self.now)

    # Before the bar's own hook, which must see the batch's time already elapsed.
    @hookimpl(tryfirst=True)
    def on_train_batch_end(self) -> None:
        self.now += self.seconds_per_batch


def frames(output: str, label: str) -> list[str]:
    """Every drawn frame of the bar labelled ``label``."""
    return [
        part for part in re.split(r"[\r\n]", output) if part.startswith(label + ":") and "|" in part
    ]


# ---------------------------------------------------------------------- not a terminal


def test_plain_file_gets_one_line_per_epoch(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    with log.open("w") as stream:
        run([("tqdm", {"stream": stream, "plain_interval": None})], max_epochs=2, record=False)
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [SUMMARY.match(line).group(1) for line in lines] == ["1", "2"], text


class Published:
    """Keeps the step losses the trainer published, by step."""

    name = "published"

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    @hookimpl
    def log_metrics(self, metrics: dict[str, float], step: int, scope: str) -> None:
        if scope == "step":
            self.losses[step] = metrics["loss"]


def test_plain_file_gets_sparse_progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    clock = FakeClock(monkeypatch, seconds_per_batch=1.0)
    published = Published()
    run(
        [ProgressBar(stream=stream, plain_interval=2.5), clock, published],
        max_epochs=2,
        log_every_n_steps=2,
    )
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    progress = [line for line in lines if not SUMMARY.match(line)]
    # One batch a second and a line every 2.5 s at most: after batches 3 and 6 of each
    # epoch (2.5 s after the epoch's start, then 2.5 s after the previous line).
    losses = published.losses
    assert [re.sub(r", val_.*$", "", line) for line in progress] == [
        f"epoch 1/2: 3/8 batches (37%), 1 batches/s, loss={losses[2]:.4g}",
        f"epoch 1/2: 6/8 batches (75%), 1 batches/s, loss={losses[4]:.4g}",
        f"epoch 2/2: 3/8 batches (37%), 1 batches/s, loss={losses[10]:.4g}",
        f"epoch 2/2: 6/8 batches (75%), 1 batches/s, loss={losses[12]:.4g}",
    ], stream.getvalue()
    # The loss is the one published last (the line at step 6 comes before step 6's
    # publication), and from the first validation on, its values follow.
    assert all(", val_loss=" in line for line in progress[2:])
    assert sum(1 for line in lines if SUMMARY.match(line)) == 2


CHILD = textwrap.dedent(
    """
    import logging, sys
    from hooktrain import hookimpl
    from hooktrain.testing import run

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    class Talker:
        name = "talker"

        @hookimpl
        def on_train_batch_end(self, trainer, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 3:
                logging.getLogger("user").warning("LOG LINE FROM TRAINING")

    options = eval(sys.argv[1])
    run([("tqdm", options), Talker()], max_epochs=2, record=False, log_every_n_steps=2)
    """
)


def test_redirected_stderr_gets_no_carriage_returns(tmp_path: Path) -> None:
    log = tmp_path / "nohup.out"
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-c", CHILD, "{}"], stderr=stderr, check=True, timeout=120)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "LOG LINE FROM TRAINING"
    assert [SUMMARY.match(line).group(1) for line in lines[1:]] == ["1", "2"], text


# ---------------------------------------------------------------------- a terminal


def run_on_pty(options: dict[str, Any], columns: int = 100, rows: int = 24) -> str:
    """Run the child with its stderr on a pseudo-terminal of ``columns`` x ``rows``;
    return what it drew."""
    main_fd, child_fd = os.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO once the child side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, repr(options)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=child_fd,
            timeout=120,
        )
    finally:
        os.close(child_fd)
        reader.join(timeout=30)
        os.close(main_fd)
    text = b"".join(chunks).decode(errors="replace")
    assert child.returncode == 0, text
    # The terminal's line discipline turns "\n" into "\r\n"; undo that.
    return text.replace("\r\n", "\n")


def test_terminal_draws_bars_and_summaries() -> None:
    text = run_on_pty({"refresh_interval": 0})
    assert "\r" in text
    epoch_frames = frames(text, "epoch 1/2")
    assert any(re.search(r"\d+%\|.*\| 8/8 \[.*batch/s, loss=", f) for f in epoch_frames), text
    assert frames(text, "validate"), "no validation bar"
    summaries = [line.split("\r")[-1] for line in text.split("\n") if "batches, " in line]
    assert [SUMMARY.match(line).group(1) for line in summaries] == ["1", "2"], text
    # Log lines go through tqdm.write: the bar is cleared first, so the line stands
    # alone instead of trailing a half-drawn frame.
    logged = [line for line in text.split("\n") if "LOG LINE FROM TRAINING" in line]
    assert len(logged) == 1
    assert logged[0].split("\r")[-1].strip() == "LOG LINE FROM TRAINING", repr(logged[0])


def test_terminal_without_logging_redirection_breaks_the_line() -> None:
    # The counterpart of the test above: it shows that check can fail. The terminal
    # reports zero columns, as an unsized pty does: the bar must still be drawn.
    text = run_on_pty({"refresh_interval": 0, "redirect_logging": False}, columns=0)
    assert frames(text, "epoch 2/2")
    logged = [line for line in text.split("\n") if "LOG LINE FROM TRAINING" in line]
    assert logged[0].split("\r")[-1].strip() != "LOG LINE FROM TRAINING"


@pytest.mark.parametrize(("columns", "rows"), [(0, 0), (0, 24), (100, 0)])
def test_a_terminal_of_no_size_still_gets_bars(columns: int, rows: int) -> None:
    # A pty nobody sized reports 0 x 0; tqdm left to itself draws nothing there.
    text = run_on_pty({"refresh_interval": 0}, columns=columns, rows=rows)
    epoch_frames = frames(text, "epoch 2/2")
    assert any(re.search(r"\d+%\|.*\| 8/8 ", frame) for frame in epoch_frames), text
    # 80 columns where the terminal said none, else the terminal's own width.
    assert max(len(frame) for frame in epoch_frames) <= (columns or 80)


@pytest.mark.parametrize(
    ("seconds_per_batch", "refresh_interval", "redraws"),
    [
        (0.25, 0.0, [1, 2, 3, 4, 5, 6, 7, 8]),  # every batch
        (0.25, 1.0, [4, 8]),  # once a second
        (0.25, 0.6, [3, 6]),  # a due redraw waits for the next batch's end
        (1.0, 0.5, [1, 2, 3, 4, 5, 6, 7, 8]),  # never more than once a batch
        (0.25, 3600.0, []),  # only the first frame and the epoch's last
    ],
)
def test_the_training_bar_is_redrawn_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
    seconds_per_batch: float,
    refresh_interval: float,
    redraws: list[int],
) -> None:
    screen = FakeTerminal()
    clock = FakeClock(monkeypatch, seconds_per_batch)
    run(
        [ProgressBar(stream=screen, refresh_interval=refresh_interval), clock],
        max_epochs=2,
        record=False,
    )
    for epoch in (1, 2):
        drawn = frames(screen.getvalue(), f"epoch {epoch}/2")
        counts = [int(re.search(r"\| (\d)/8 \[", frame).group(1)) for frame in drawn]
        # The first frame as the bar opens, the redraws, and the last frame at the
        # epoch's end when the last batch did not redraw already.
        expected = [0, *redraws] + ([] if redraws[-1:] == [8] else [8])
        assert counts == expected, drawn


def test_totals_are_the_trainers_batch_counts() -> None:
    screen = FakeTerminal()
    train, val = make_data(n=128)  # 8 training batches, 2 validation batches
    trainer = Trainer(
        plugins=[ProgressBar(stream=screen, refresh_interval=0)],
        max_epochs=1,
        limit_train_batches=5,
        device="cpu",
    )
    trainer.fit(
        make_model(),
        train,
        [val, val],
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    text = screen.getvalue()
    trained = [re.search(r"\| (\d+/\d+) \[", f).group(1) for f in frames(text, "epoch 1/1")]
    assert trained == ["0/5", "1/5", "2/5", "3/5", "4/5", "5/5"]
    # Two loaders of two batches: one count across both.
    validated = [re.search(r"\| (\d+/\d+) \[", f).group(1) for f in frames(text, "validate")]
    assert validated == ["0/4", "1/4", "2/4", "3/4", "4/4"]


@pytest.mark.parametrize("leave", [True, False])
def test_leave_keeps_or_clears_the_epoch_bar(leave: bool) -> None:
    stream = FakeTerminal()
    run(
        [("tqdm", {"stream": stream, "leave": leave})],
        max_epochs=2,
        record=False,
        check_val_every_n_epoch=5,  # no validation bar in between
    )
    kept = re.findall(r"epoch \d/2: 100%\|[^\r\n]*\]\n", stream.getvalue())
    assert len(kept) == (2 if leave else 0), repr(stream.getvalue())


def test_terminal_option_overrides_detection(tmp_path: Path) -> None:
    stream = FakeTerminal()
    run([("tqdm", {"stream": stream, "terminal": False, "plain_interval": None})], max_epochs=2)
    assert "\r" not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 2


def test_metrics_option_picks_and_orders_names() -> None:
    stream = io.StringIO()
    run([ProgressBar(stream=stream, metrics=["val_acc", "loss"])], max_epochs=1, record=False)
    assert re.match(rf"^epoch 1/1: val_acc={NUMBER}, loss={NUMBER} \(8 batches", stream.getvalue())


def test_standalone_validate_prints_its_means() -> None:
    stream = io.StringIO()
    result = run([ProgressBar(stream=stream)], stage="validate", record=False)
    values = result.result
    expected = f"validate: val_loss={values['val_loss']:.4g}, val_acc={values['val_acc']:.4g}"
    assert stream.getvalue() == expected + "\n"


class PretendRankOne:
    name = "rank"

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.global_rank = 1


def test_only_global_zero_draws() -> None:
    stream = FakeTerminal()
    # Listed after the bar: the bar must decide after every setup hook has run.
    run([("tqdm", {"stream": stream}), PretendRankOne()], max_epochs=1, record=False)
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------- cost


class CountConversions:
    """Counts tensor-to-Python conversions (each one waits for the device)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for method in ("item", "tolist", "__float__"):
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, self._counting(original))

    def _counting(self, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any) -> Any:
            self.count += 1
            return original(tensor, *args)

        return counted


class NullLogger:
    """Makes the core publish (and convert) exactly as it does for any logger."""

    name = "null"

    @hookimpl
    def log_metrics(self) -> None:
        pass


def conversions(monkeypatch: pytest.MonkeyPatch, plugins: list[Any], tmp_path: Path) -> int:
    model, (train, val) = make_model(), make_data(n=256)
    trainer = Trainer(
        plugins=[*plugins, NullLogger()], max_epochs=2, log_every_n_steps=8, seed=0, device="cpu"
    )
    counter = CountConversions(monkeypatch)
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    monkeypatch.undo()
    return counter.count


class ReadsLossEveryStep:
    """What the count must catch: a plugin reading the loss as a float every step."""

    name = "reads_loss"

    @hookimpl
    def on_train_batch_end(self, outputs: Any) -> None:
        float(outputs["loss"].detach())


def test_bar_and_logger_add_no_device_sync(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    baseline = conversions(monkeypatch, [], tmp_path)
    screen = FakeTerminal()
    bar = ProgressBar(stream=screen, refresh_interval=0)
    with_plugins = conversions(monkeypatch, [bar, ("tensorboard", {"log_dir": tmp_path})], tmp_path)
    # Redrawn after each of the 16 batches of an epoch, showing published losses,
    # the bar converts nothing itself.
    drawn = frames(screen.getvalue(), "epoch 1/2")
    assert len(drawn) == 17
    assert "loss=" in drawn[-1]
    assert with_plugins == baseline
    # The count does see a per-step read.
    assert conversions(monkeypatch, [ReadsLossEveryStep()], tmp_path) == baseline + 32


def test_installed_under_its_entry_point_name() -> None:
    assert installed_plugins()["tqdm"].distribution == "hooktrain-tqdm"
    listing = subprocess.run(
        [sys.executable, "-m", "hooktrain", "plugins"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert "hooktrain-tqdm" in listing.stdout


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="refresh_interval"):
        ProgressBar(refresh_interval=-1)
    with pytest.raises(ValueError, match="metrics"):
        ProgressBar(metrics="loss")


class ThreadWatcher:
    """Notes every thread alive at each batch's end, training and validation."""

    name = "thread_watcher"

    def __init__(self) -> None:
        self.seen: set[threading.Thread] = set()

    @hookimpl
    def on_train_batch_end(self) -> None:
        self.seen.update(threading.enumerate())

    @hookimpl
    def on_validation_batch_end(self) -> None:
        self.seen.update(threading.enumerate())


@pytest.mark.parametrize("terminal", [True, False])
def test_no_thread_is_started(terminal: bool) -> None:
    before = set(threading.enumerate())
    watcher = ThreadWatcher()
    bar = ProgressBar(
        stream=FakeTerminal(), terminal=terminal, refresh_interval=0, plain_interval=1e-9
    )
    run([bar, watcher], max_epochs=2, record=False)
    # Neither a timer of the plugin's nor tqdm's monitor thread.
    assert watcher.seen and watcher.seen <= before, watcher.seen - before
    assert set(threading.enumerate()) <= before


def test_the_summary_shows_each_stage_and_loaders_loss_first() -> None:
    # Values arrive in name order; with two validation loaders the losses came
    # after the accuracies (val_acc/dataloader_idx_0 ... val_loss/dataloader_idx_0).
    stream = io.StringIO()
    train, val = make_data()
    trainer = Trainer(plugins=[("tqdm", {"stream": stream, "plain_interval": None})], device="cpu")
    trainer.fit(
        make_model(),
        train,
        [val, val],
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        metrics={"acc": accuracy},
    )
    names = re.findall(r"([\w/]+)=", stream.getvalue().splitlines()[-1])
    assert names == [
        "loss",
        "acc",
        "val_loss/dataloader_idx_0",
        "val_loss/dataloader_idx_1",
        "val_acc/dataloader_idx_0",
        "val_acc/dataloader_idx_1",
    ]
