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
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_tqdm import ProgressBar

from hooktrain import Trainer, hookimpl
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


class SlowBatches:
    """Makes every training batch take ``seconds`` (sleeping, so the bar's timer
    thread runs meanwhile): the bar redraws on a timer, not per batch."""

    name = "slow_batches"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @hookimpl
    def on_train_batch_end(self) -> None:
        time.sleep(self.seconds)


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


def test_plain_file_gets_sparse_progress_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    # Batches of 20 ms and a line every 10 ms at most: many lines, whose format, not
    # timing, is tested.
    run(
        [ProgressBar(stream=stream, plain_interval=0.01), SlowBatches(0.02)],
        max_epochs=2,
        log_every_n_steps=2,
    )
    text = stream.getvalue()
    assert "\r" not in text
    progress = [line for line in text.splitlines() if not SUMMARY.match(line)]
    assert len(progress) >= 8
    for line in progress:
        assert re.match(rf"^epoch [12]/2: \d/8 batches \(\d+%\), {NUMBER} batches/s", line), line
    # After the first publication (step 2) the postfix carries the loss.
    assert "loss=" in progress[-1]
    assert sum(1 for line in text.splitlines() if SUMMARY.match(line)) == 2


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


def run_on_pty(options: dict[str, Any], columns: int = 100) -> str:
    """Run the child with its stderr on a pseudo-terminal ``columns`` wide; return
    what it drew."""
    main_fd, child_fd = os.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
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


def test_redraws_are_throttled_by_time() -> None:
    eager, throttled = FakeTerminal(), FakeTerminal()
    eager_bar = ProgressBar(stream=eager, refresh_interval=0)
    run([eager_bar, SlowBatches(0.02)], max_epochs=2, record=False)
    run([ProgressBar(stream=throttled, refresh_interval=3600)], max_epochs=2, record=False)
    # As often as the timer allows (every 5 ms) through 8 batches of 20 ms: many
    # frames. Once an hour: the first and the last.
    assert len(frames(eager.getvalue(), "epoch 1/2")) >= 8
    assert len(frames(throttled.getvalue(), "epoch 1/2")) == 2
    assert len(frames(throttled.getvalue(), "epoch 2/2")) == 2


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


def test_bar_and_logger_add_no_device_sync(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slow = SlowBatches(0.01)
    baseline = conversions(monkeypatch, [slow], tmp_path)
    screen = FakeTerminal()
    bar = ProgressBar(stream=screen, refresh_interval=0, stale_after=None)
    with_plugins = conversions(
        monkeypatch, [bar, slow, ("tensorboard", {"log_dir": tmp_path})], tmp_path
    )
    # Redrawn many times through 32 batches of 10 ms, the bar converts nothing itself.
    assert len(frames(screen.getvalue(), "epoch 1/2")) >= 8
    assert with_plugins == baseline
    # A bar that reads the latest values at each redraw is caught by the same count.
    eager = ProgressBar(stream=FakeTerminal(), refresh_interval=0, stale_after=0)
    assert conversions(monkeypatch, [eager, slow], tmp_path) >= baseline + 8


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


def test_the_training_bar_adds_no_hook_per_step() -> None:
    # Any on_train_batch_end implementation would take the trainer off its lean loop.
    trainer = Trainer(plugins=["tqdm"], device="cpu")
    assert trainer.plugin_manager.hook.on_train_batch_end.get_hookimpls() == []


def test_the_bar_keeps_ticking_during_one_long_step() -> None:
    screen = FakeTerminal()
    run(
        [ProgressBar(stream=screen, refresh_interval=0.02), SlowBatches(0.3)],
        max_epochs=1,
        limit_train_batches=1,
        record=False,
    )
    # Redrawn by the timer through the 0.3 s of the only batch (about 15 times at
    # 20 ms), where a per-batch redraw would draw the first and the last frame only.
    assert len(frames(screen.getvalue(), "epoch 1/1")) >= 5, screen.getvalue()
