"""The plugin's own event-file writer: its records, read back by TensorBoard, and
what reaches the disk when."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hooktrain_tensorboard import _event_file
from hooktrain_tensorboard._event_file import EventFile, crc32c, masked_crc32c, record
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from hooktrain import hookimpl
from hooktrain.testing import run


def read(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def records(path: Path) -> list[Event]:
    """Every record of one file, through TensorBoard's own record reader (which
    checks both CRCs of each record)."""
    return [Event.FromString(data) for data in RawEventFileLoader(str(path)).Load()]


def test_crc32c_is_castagnoli_and_masked_as_tensorboard_masks_it() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for size in [*range(0, 40), 255, 1000, 4099]:
        data = os.urandom(size)
        assert masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data), size


def test_record_framing() -> None:
    data = b"some event bytes"
    framed = record(data)
    length = len(data).to_bytes(8, "little")
    assert framed[:8] == length
    assert framed[8:12] == masked_crc32c(length).to_bytes(4, "little")
    assert framed[12:-4] == data
    assert framed[-4:] == masked_crc32c(data).to_bytes(4, "little")
    # The header of a length seen before comes from the cache, unchanged.
    assert record(b"x" * len(data))[:12] == framed[:12]


def test_scalars_read_back_with_their_steps_values_and_wall_times(tmp_path: Path) -> None:
    file = EventFile(tmp_path)
    file.add_scalars(1000.25, 3, [("train/loss", 0.5), ("lr/group_0", 0.1)])
    file.add_scalars(1001.5, 6, [("train/loss", 0.25), ("lr/group_0", 0.05)])
    file.add_scalars(1002.75, 6, [("epoch/loss", 1.0 / 3.0)])
    file.close()
    assert file.closed
    assert file.path.parent == tmp_path
    assert file.path.name.startswith("events.out.tfevents.")

    events = read(tmp_path)
    loss = events.Scalars("train/loss")
    assert [(e.wall_time, e.step, e.value) for e in loss] == [(1000.25, 3, 0.5), (1001.5, 6, 0.25)]
    assert [e.value for e in events.Scalars("lr/group_0")] == pytest.approx([0.1, 0.05])
    (epoch,) = events.Scalars("epoch/loss")
    assert (epoch.step, epoch.wall_time) == (6, 1002.75)
    assert epoch.value == pytest.approx(1.0 / 3.0)  # a float32 in the file

    first = records(file.path)[0]
    assert first.file_version == "brain.Event:2"
    assert first.source_metadata.writer == "hooktrain_tensorboard"


def test_the_restart_marker_follows_the_version_record(tmp_path: Path) -> None:
    file = EventFile(tmp_path, purge_step=9)
    file.close()
    version, marker_version, start = records(file.path)
    assert version.file_version == "brain.Event:2"
    assert (marker_version.step, marker_version.file_version) == (9, "brain.Event:2")
    assert start.step == 9
    assert start.session_log.status == start.session_log.START


def test_events_stay_in_memory_until_written(tmp_path: Path) -> None:
    file = EventFile(tmp_path, purge_step=0)
    # The version record and the restart marker are on disk at once.
    assert len(records(file.path)) == 3
    size = file.path.stat().st_size
    file.add_scalars(1.0, 1, [("train/loss", 1.0)])
    file.add_scalars(2.0, 2, [("train/loss", 2.0)])
    assert file.pending == 2
    assert file.path.stat().st_size == size
    file.write()
    assert file.pending == 0
    assert [e.step for e in records(file.path)[3:]] == [1, 2]
    file.write()  # nothing pending: nothing written
    assert len(records(file.path)) == 5
    file.close()
    file.close()  # closing twice is harmless


def test_two_files_of_one_second_get_different_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer's file already has the name the counter gives next.
    import itertools

    monkeypatch.setattr(_event_file.time, "time", lambda: 1_700_000_000.0)
    monkeypatch.setattr(_event_file, "_counter", itertools.count(5))
    taken = f"events.out.tfevents.1700000000.{socket.gethostname()}.{os.getpid()}.5"
    (tmp_path / taken).write_bytes(b"not ours")
    file = EventFile(tmp_path)
    file.close()
    assert file.path.name.endswith(".6")
    assert (tmp_path / taken).read_bytes() == b"not ours"


class ThreadWatch:
    """Records the threads alive while the trainer publishes values."""

    name = "threads"

    def __init__(self) -> None:
        self.seen: set[str] = set()

    @hookimpl
    def log_metrics(self) -> None:
        self.seen.update(thread.name for thread in threading.enumerate())


def test_no_writer_thread(tmp_path: Path) -> None:
    before = {thread.name for thread in threading.enumerate()}
    watch = ThreadWatch()
    run([("tensorboard", {"log_dir": tmp_path}), watch], max_epochs=2, record=False)
    assert watch.seen and watch.seen <= before


def test_max_queue_forces_a_write(tmp_path: Path) -> None:
    from hooktrain_tensorboard import TensorBoardLogger

    class Size:
        name = "size"

        def __init__(self, logger: TensorBoardLogger) -> None:
            self.logger, self.pending = logger, []

        @hookimpl(trylast=True)
        def log_metrics(self, scope: str) -> None:
            if scope == "step":
                self.pending.append(self.logger._file.pending)

    logger = TensorBoardLogger(tmp_path, flush_secs=3600, max_queue=4, log_hparams=False)
    size = Size(logger)
    run([logger, size], max_epochs=1, log_every_n_steps=1, record=False)
    # 8 steps: never more than max_queue - 1 events wait.
    assert len(size.pending) == 8
    assert max(size.pending) == 3


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import hooktrain_tensorboard
    from hooktrain import hookimpl
    from hooktrain.testing import run

    # Epoch ends a few milliseconds apart still write (not at most once a second).
    hooktrain_tensorboard._EPOCH_FLUSH_MIN_S = 0.0

    class Kill:
        name = "kill"

        @hookimpl
        def log_metrics(self, trainer, scope):
            if scope == "step" and trainer.current_epoch == 1 and trainer.epoch_batches_done == 5:
                os.kill(os.getpid(), signal.SIGKILL)

    options = {"log_dir": sys.argv[1], "flush_secs": float(sys.argv[2])}
    run([("tensorboard", options), Kill()], max_epochs=3, log_every_n_steps=1, record=False)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(
    ("flush_secs", "on_disk"),
    [
        # Nothing forces a write between the first epoch's end and the kill at
        # step 13: steps 9 to 12, and 13, die with the process.
        (3600.0, list(range(1, 9))),
        # Every publication is past flush_secs: each is written as it is logged.
        (1e-9, list(range(1, 14))),
    ],
)
def test_a_killed_process_loses_only_what_waited_for_a_flush_point(
    tmp_path: Path, flush_secs: float, on_disk: list[int]
) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs"), str(flush_secs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    events = read(tmp_path / "runs" / "default" / "version_0")
    assert [e.step for e in events.Scalars("train/loss")] == on_disk
    assert [e.step for e in events.Scalars("epoch/loss")] == [8]


def test_hparams_of_every_kind(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    run(
        [("tensorboard", {"log_dir": tmp_path, "hparams": {"text": "a", "n": 3, "on": True}})],
        max_epochs=1,
        record=False,
    )
    content = read(tmp_path / "default" / "version_0").PluginTagToContent("hparams")
    assert set(content) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["text"].string_value == "a"
    assert values["n"].number_value == 3
    assert values["on"].number_value == 1  # as torch.utils.tensorboard records a bool
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    kinds = {info.name: info.type for info in experiment.experiment.hparam_infos}
    assert kinds["text"] == api_pb2.DATA_TYPE_STRING
    assert kinds["n"] == api_pb2.DATA_TYPE_FLOAT64
    assert kinds["max_epochs"] == api_pb2.DATA_TYPE_FLOAT64
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS
