"""What reaches the disk when, read back with TensorBoard's own reader: after a
process is killed outright, after each stage, and the hyperparameters' records."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hooktrain import hookimpl
from hooktrain.errors import HookError
from hooktrain.testing import make_data, run


def read(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


#: What a run records of its hyperparameters: the start and end of its session.
HPARAMS_TAGS = {"_hparams_/session_start_info", "_hparams_/session_end_info"}

# A child process training 3 epochs of 8 steps, publishing every step, that kills
# itself with SIGKILL at step 13 (the 5th of the second epoch), right after the
# plugin took that step's values; it pauses for PAUSE seconds before that step.
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    import hooktrain.loggers
    from hooktrain import hookimpl
    from hooktrain.testing import run

    log_dir, flush_secs, max_queue, pause = sys.argv[1], *map(float, sys.argv[2:])
    # Epoch ends a few milliseconds apart still flush (not at most once a second).
    hooktrain.loggers.EPOCH_FLUSH_MIN_S = 0.0

    class Kill:
        name = "kill"

        @hookimpl
        def on_train_batch_start(self, trainer):
            if trainer.global_step == 12:
                time.sleep(pause)

        @hookimpl(trylast=True)
        def log_metrics(self, trainer, scope):
            if scope == "step" and trainer.global_step == 13:
                os.kill(os.getpid(), signal.SIGKILL)

    options = {"log_dir": log_dir, "flush_secs": flush_secs, "max_queue": int(max_queue)}
    run([("tensorboard", options), Kill()], max_epochs=3, log_every_n_steps=1, record=False)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(
    ("flush_secs", "max_queue", "pause", "on_disk"),
    [
        # Nothing is handed to the writer between the first epoch's end and the
        # kill: steps 9 to 13 die with the process.
        (3600.0, 1000, 0.0, list(range(1, 9))),
        # Step 13 is published more than flush_secs after the epoch's end: it and
        # the steps before it are written then.
        (0.2, 1000, 0.3, list(range(1, 14))),
        # One publication waiting is a full queue: each is written as it is logged.
        (3600.0, 1, 0.0, list(range(1, 14))),
    ],
)
def test_a_killed_process_loses_only_what_waited_for_a_flush_point(
    tmp_path: Path, flush_secs: float, max_queue: int, pause: float, on_disk: list[int]
) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(flush_secs), str(max_queue), str(pause)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    events = read(tmp_path / "default" / "version_0")
    assert steps(events, "train/loss") == on_disk
    assert steps(events, "lr/group_0") == on_disk
    assert steps(events, "epoch/loss") == [8]
    # The hyperparameters waited for the first flush point too, and made it; the
    # session has no end, as the fit never finished.
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/session_start_info"}


def test_no_writer_thread_outlives_a_stage(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    result = run([("tensorboard", {"log_dir": tmp_path})], max_epochs=1, record=False)
    assert set(threading.enumerate()) == before
    result.trainer.validate(result.model, make_data()[1], loss_fn=F.cross_entropy)
    assert set(threading.enumerate()) == before


def test_hparams_of_every_kind(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    run(
        [("tensorboard", {"log_dir": tmp_path, "hparams": {"text": "a", "n": 3, "on": True}})],
        max_epochs=1,
        record=False,
    )
    content = read(tmp_path / "default" / "version_0").PluginTagToContent("hparams")
    # No experiment summary: TensorBoard builds the columns from every run's values.
    assert set(content) == HPARAMS_TAGS
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["text"].string_value == "a"
    assert values["n"].number_value == 3
    assert values["on"].number_value == 1  # as torch.utils.tensorboard records a bool
    assert values["max_epochs"].number_value == 1
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS


def test_a_fit_that_failed_or_was_stopped_is_not_recorded_a_success(tmp_path: Path) -> None:
    # torch's hparams() gives a session end marked success, which was written as the
    # fit started: TensorBoard listed crashed and killed runs as successful.
    class Fails:
        @hookimpl
        def on_train_epoch_end(self, trainer):
            raise RuntimeError("the fit fails")

    class Stopped:
        @hookimpl
        def on_train_epoch_end(self, trainer):
            trainer.should_stop = trainer.interrupted = True  # as the checkpoint plugin on SIGTERM

    with pytest.raises(HookError, match="the fit fails"):
        run([("tensorboard", {"log_dir": tmp_path / "failed"}), Fails()], record=False)
    run([("tensorboard", {"log_dir": tmp_path / "stopped"}), Stopped()], record=False)
    for outcome in ("failed", "stopped"):
        content = read(tmp_path / outcome / "default" / "version_0").PluginTagToContent("hparams")
        assert set(content) == {"_hparams_/session_start_info"}, outcome
