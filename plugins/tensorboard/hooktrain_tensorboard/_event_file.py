"""A TensorBoard event file written by the training thread itself, in batches.

TensorBoard reads ``events.out.tfevents.*`` files: a sequence of records, each an
``Event`` protocol buffer framed as TFRecord does it (all little-endian)::

    uint64  length of the data
    uint32  masked CRC-32C of those 8 bytes
    bytes   data (the serialized Event)
    uint32  masked CRC-32C of the data

``SummaryWriter`` hands every event to a writer thread through a queue; each
hand-over wakes that thread, and each flush waits for it. Here events are framed
as they are logged, kept in memory, and written with one ``write`` call at the
plugin's flush points: no thread, no queue, no waiting.

Importing this module imports TensorBoard's protocol buffers (not the rest of
TensorBoard); the plugin imports it when it is constructed.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata

__all__ = ["EventFile", "masked_crc32c", "record"]

FILE_VERSION = "brain.Event:2"
WRITER = "hooktrain_tensorboard"

# ---------------------------------------------------------------------- CRC-32C


def _crc_tables() -> tuple[tuple[int, ...], ...]:
    """Lookup tables for CRC-32C (Castagnoli, reflected polynomial 0x82F63B78),
    four of them, to fold in four bytes per step ("slicing by 4")."""
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        first.append(crc)
    tables = [tuple(first)]
    for _ in range(3):
        previous = tables[-1]
        tables.append(tuple(first[crc & 0xFF] ^ (crc >> 8) for crc in previous))
    return tuple(tables)


_T0, _T1, _T2, _T3 = _crc_tables()


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` (pure Python, about 50 ns a byte)."""
    crc = 0xFFFFFFFF
    words = len(data) >> 2
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    for word in struct.unpack_from(f"<{words}I", data):
        crc ^= word
        crc = t3[crc & 0xFF] ^ t2[(crc >> 8) & 0xFF] ^ t1[(crc >> 16) & 0xFF] ^ t0[crc >> 24]
    for byte in data[words << 2 :]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: the CRC rotated right by 15 bits plus a constant,
    so that a CRC of data containing CRCs stays well distributed."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------- records

# A record's header depends only on its length, and a run's scalar events have a
# handful of lengths: each header is computed once.
_headers: dict[int, bytes] = {}


def record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    size = len(data)
    header = _headers.get(size)
    if header is None:
        length = struct.pack("<Q", size)
        header = _headers[size] = length + struct.pack("<I", masked_crc32c(length))
    return header + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------------- the file

# Part of a file's name, after the second and the process: keeps two files one
# process creates in the same second apart (TensorBoard's writer counts the same way).
_counter = itertools.count()


class EventFile:
    """One event file, created in ``run_dir`` with TensorBoard's naming:
    ``events.out.tfevents.<second>.<host>.<pid>.<n>``.

    Its first record says the file's format version. With ``purge_step``, the
    next records mark a restart at that step (as ``SummaryWriter(purge_step=...)``
    does): TensorBoard then discards the events of earlier files at that step or
    later. These first records are written at once.

    Later events wait in memory, as they were given, until :meth:`write`: building
    and framing them there, a batch at a time, costs the training loop less than
    doing it at each call (measured in a training run: about 30 us to frame one
    small event between training steps, against 4 us in a tight loop).
    """

    def __init__(self, run_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        host, pid = socket.gethostname(), os.getpid()
        while True:
            name = f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}.{next(_counter)}"
            try:
                # Exclusive creation: never append to another writer's file.
                self._file = open(Path(run_dir) / name, "xb")  # noqa: SIM115 - closed in close()
            except FileExistsError:
                continue
            break
        self.path = Path(run_dir) / name
        # Events, or (wall time, step, [(tag, value), ...]) for scalars.
        self._pending: list[Event | tuple[float, int, list[tuple[str, float]]]] = []
        now = time.time()
        self.add(
            Event(
                wall_time=now,
                file_version=FILE_VERSION,
                source_metadata=SourceMetadata(writer=WRITER),
            )
        )
        if purge_step is not None:
            self.add(Event(wall_time=now, step=purge_step, file_version=FILE_VERSION))
            self.add(
                Event(
                    wall_time=now,
                    step=purge_step,
                    session_log=SessionLog(status=SessionLog.START),
                )
            )
        self.write()

    @property
    def pending(self) -> int:
        """Events waiting in memory."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def add(self, event: Event) -> None:
        """Keep ``event`` for the next :meth:`write`."""
        self._pending.append(event)

    def add_scalars(self, wall_time: float, step: int, values: list[tuple[str, float]]) -> None:
        """Keep one event of scalar summaries (``simple_value``) for the next
        :meth:`write`. ``values`` is kept as it is: do not change it afterwards."""
        self._pending.append((wall_time, step, values))

    def write(self) -> None:
        """Hand every pending event to the operating system, in one write: from
        then on they survive the process being killed."""
        if not self._pending:
            return
        records = []
        for item in self._pending:
            if type(item) is tuple:
                wall_time, step, values = item
                item = Event(wall_time=wall_time, step=step)
                add = item.summary.value.add
                for tag, value in values:
                    add(tag=tag, simple_value=value)
            records.append(record(item.SerializeToString()))
        self._file.write(b"".join(records))
        self._file.flush()
        self._pending = []

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.write()
            finally:
                self._file.close()
