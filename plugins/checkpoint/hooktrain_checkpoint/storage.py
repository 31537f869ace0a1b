"""The checkpoint file: written atomically, verified on load, loaded safely.

A checkpoint is an ordinary ``torch.save`` zip archive, so ``torch.load(path,
weights_only=True)`` reads it without this package. What this module adds lives in
the zip archive's comment (a field of the format that every zip reader, torch's
included, skips): a JSON record holding the progress of the run and the SHA-256
of every byte of the file before that comment. A file whose record is missing or
whose digest does not match is *damaged*; nothing else is trusted.

Writing goes to a hidden temporary file in the destination directory, which is
flushed and fsynced, then renamed over the destination (``os.replace`` is atomic
on POSIX and Windows), and the directory is fsynced so the rename itself survives
a power cut. A process killed at any moment therefore leaves the destination
either complete or as it was.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hooktrain.errors import ConfigurationError, missing_checkpoint_message
from hooktrain_checkpoint.errors import DamagedCheckpointError, UnsafeCheckpointError

__all__ = [
    "FORMAT",
    "INLINE_ENCODE_LIMIT",
    "CheckpointInfo",
    "DamagedCheckpointError",
    "UnsafeCheckpointError",
    "encode",
    "link_or_copy",
    "load_file",
    "read_info",
    "remove_stale_temporaries",
    "small_enough_to_encode_inline",
    "verify",
    "write_encoded",
    "write_file",
]

#: Written into every record; a reader refuses records of another format.
FORMAT = "hooktrain-checkpoint/1"
SUFFIX = ".ckpt"
#: The stem of the file that always holds the newest state (``last.ckpt``).
LAST_NAME = "last"
#: The file of a sharded checkpoint's directory that holds all but the tensors.
STATE_FILE = "state" + SUFFIX

_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22  # the end-of-central-directory record without its comment
_MAX_COMMENT = 0xFFFF
_DIGEST_PLACEHOLDER = "0" * 64
_CHUNK = 8 << 20
_BUFFER = 1 << 20  # writes of torch.save smaller than this are gathered (see _HashingWriter)
_temp_counter = itertools.count()


@dataclass(frozen=True)
class CheckpointInfo:
    """What the record of a checkpoint file says, read without loading the file.

    :ivar path: the file.
    :ivar record: the JSON record (progress, versions, digest, time of saving).
    :ivar covered_bytes: how many leading bytes of the file the digest covers.
    """

    path: Path
    record: Mapping[str, Any]
    covered_bytes: int

    @property
    def recency_key(self) -> tuple[int, ...]:
        """Orders checkpoints from the least to the most recently saved.

        First by the record's ``sequence``: each save of the plugin counts one
        more, and a fit starts counting after the highest number its directory
        holds, so a fresh run's checkpoints, and those of a run resumed from an
        older file, come after whatever the directory held, whatever progress
        either made. A counter, not a clock: a clock set back (a restart on
        another node, an NTP step) would put a run's newest save behind its older
        ones. Then by progress, which only breaks ties between runs of a directory
        written before saves were numbered across it (each run counted from 1).
        """
        return (int(self.record.get("sequence", 0)), *self.progress_key)

    @property
    def progress_key(self) -> tuple[int, int, int, int, int]:
        """Orders checkpoints of one run from oldest to newest."""
        record = self.record
        return (
            int(record.get("global_step", 0)),
            int(record.get("epoch", 0)),
            int(bool(record.get("epoch_complete", False))),
            int(record.get("epoch_batches_done", 0)),
            int(record.get("sequence", 0)),
        )


class _HashingWriter:
    """A file-like sink for ``torch.save`` that hashes what passes through and holds
    back the last bytes, which are the zip archive's end record, so that the
    comment length in it can be set before it is written.

    ``torch.save`` writes in many small pieces (zip headers, record names: dozens
    per tensor), and handing each to the hash and the file one by one cost more
    than the pickling itself for a small model. Pieces under ``_BUFFER`` bytes are
    gathered first and hashed and written together; larger ones (the data of big
    tensors) go through without being copied.
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.size = 0

    def _emit(self, data: Any) -> None:
        if len(data):
            self._hash.update(data)
            self._file.write(data)
            self.size += len(data)

    def _drain(self, keep: int) -> None:
        """Emit what is pending except its last ``keep`` bytes."""
        pending = self._pending
        cut = len(pending) - keep
        if cut > 0:
            with memoryview(pending) as view, view[:cut] as head:
                self._emit(head)
            del pending[:cut]

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        if count < _BUFFER:
            self._pending += view
            if len(self._pending) >= _BUFFER:
                self._drain(keep=_EOCD_SIZE)
        else:
            self._drain(keep=0)  # all of it comes before these bytes
            self._emit(view[:-_EOCD_SIZE])
            self._pending += view[-_EOCD_SIZE:]
        return count

    def flush(self) -> None:
        self._file.flush()

    def finish(self, record: Mapping[str, Any]) -> None:
        """Write the end record with ``record`` (plus the digest) as its comment."""
        self._drain(keep=_EOCD_SIZE)
        tail = bytes(self._pending)
        if len(tail) != _EOCD_SIZE or tail[:4] != _EOCD_SIGNATURE or tail[20:22] != b"\0\0":
            raise RuntimeError("torch.save did not end with a zip end record; format changed?")
        # The digest covers the comment length, so the record's length must be known
        # before the digest is: serialise it with a placeholder of the same size.
        text = json.dumps({**record, "sha256": _DIGEST_PLACEHOLDER}, sort_keys=True)
        length = len(text.encode())
        if length > _MAX_COMMENT:
            raise ValueError(f"checkpoint record too long ({length} bytes)")
        tail = tail[:20] + length.to_bytes(2, "little")
        self._hash.update(tail)
        comment = text.replace(_DIGEST_PLACEHOLDER, self._hash.hexdigest()).encode()
        self._file.write(tail)
        self._file.write(comment)
        self.size += len(tail) + len(comment)


def _temp_path(path: Path) -> Path:
    # Hidden, in the same directory (rename must not cross file systems), and
    # named by host and process so a later run can tell whose leftovers these are.
    host = socket.gethostname().replace(".", "_")
    unique = f"{host}.{os.getpid()}.{threading.get_ident()}.{next(_temp_counter)}"
    return path.with_name(f".{path.name}.{unique}.tmp")


def prepare_directory(directory: Path) -> None:
    """Create ``directory``, check that a file can be written in it, and remove the
    temporaries killed runs left there, when a fit starts.

    :raises ConfigurationError: the directory cannot be created or written to (a
        read-only mount): found here, not at the first save, an epoch into the run.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"hooktrain-checkpoint: cannot write checkpoints to {os.fspath(directory)!r}: "
            f"{exc.strerror or exc}; choose a writable dirpath"
        ) from exc
    remove_stale_temporaries(directory)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> None:
    """Delete the temporaries in ``directory`` that a killed process on this host
    left behind (those whose process is gone); others' are left alone."""
    host = socket.gethostname().replace(".", "_")
    for temp in Path(directory).glob(".*.tmp"):
        # .<name>.<host>.<pid>.<thread>.<n>.tmp, as _temp_path names them
        parts = temp.name.rsplit(".", 5)
        if len(parts) != 6 or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid() or _process_alive(pid):
            continue
        if temp.is_dir():  # a sharded checkpoint's directory, never committed
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def replace(source: Path, target: Path) -> None:
    """``os.replace(source, target)``, also where ``target`` is a directory (a sharded
    checkpoint of the same name): that is first renamed to ``<stem>.replaced.ckpt``,
    a name that resuming still reads should the process die between the two
    renames, and removed once ``source`` has taken its place."""
    aside = None
    if target.is_dir() and not target.is_symlink():
        aside = target.with_name(f"{target.stem}.replaced{SUFFIX}")
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink(missing_ok=True)
        os.replace(target, aside)
    os.replace(source, target)
    if aside is not None:
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_into(file: Any, state: Any, record: Mapping[str, Any]) -> int:
    import torch

    writer = _HashingWriter(file)
    torch.save(state, writer)
    writer.finish({"format": FORMAT, **record})
    return writer.size


#: A checkpoint whose model, with three times its parameters' bytes, stays under this
#: many bytes is encoded on the training thread and only written in the background.
INLINE_ENCODE_LIMIT = 4 << 20


def small_enough_to_encode_inline(module: Any) -> bool:
    """Whether checkpoints of ``module`` are small enough to encode on the training
    thread (`INLINE_ENCODE_LIMIT`), judged from its parameters' bytes: optimizer
    state is about the same again, or twice for Adam."""
    parameter_bytes = sum(p.nbytes for p in module.parameters())
    return 3 * parameter_bytes <= INLINE_ENCODE_LIMIT


def encode(state: Any, record: Mapping[str, Any]) -> bytes:
    """The complete content of the checkpoint file for ``state`` and ``record``
    (``torch.save``'s archive, its record and digest in the comment), built in memory.

    Once encoded, the state may change: the bytes are a copy. Writing them with
    :func:`write_encoded` gives the same file as :func:`write_file`.
    """
    buffer = io.BytesIO()
    _save_into(buffer, state, record)
    return buffer.getvalue()


def _write_atomically(path: str | os.PathLike[str], fill: Any, *, sync_directory: bool) -> int:
    target = Path(path)
    temp = _temp_path(target)
    try:
        with open(temp, "wb") as file:
            size = fill(file)
            file.flush()
            os.fsync(file.fileno())
        replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if sync_directory:
        _fsync_directory(target.parent)
    return size


def write_file(
    state: Any,
    path: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    sync_directory: bool = True,
) -> int:
    """Write ``state`` with ``torch.save`` to ``path`` atomically, with ``record``
    and its digest in the archive's comment.

    :param sync_directory: fsync the directory after the rename, so the rename
        survives a power loss; a caller that renames another file into the same
        directory right after may leave it to that second rename's fsync.

    :return: the size of the file in bytes.
    """
    return _write_atomically(
        path, lambda file: _save_into(file, state, record), sync_directory=sync_directory
    )


def write_encoded(data: bytes, path: str | os.PathLike[str], *, sync_directory: bool = True) -> int:
    """Write bytes from :func:`encode` to ``path`` atomically, as :func:`write_file`
    does (temporary file, fsync, rename, directory fsync).

    :return: the size of the file in bytes.
    """
    return _write_atomically(path, lambda file: file.write(data), sync_directory=sync_directory)


def link_or_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Make ``destination`` an atomic replica of the complete file ``source``: a hard
    link when the file system allows one (no data is copied), a copy otherwise."""
    source, destination = Path(source), Path(destination)
    temp = _temp_path(destination)
    try:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
            with open(temp, "rb+") as file:
                os.fsync(file.fileno())
        replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(destination.parent)


def read_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read the record of a checkpoint without loading or verifying its data: a
    file, or a sharded checkpoint's directory (the record of its ``state.ckpt``).

    :raises DamagedCheckpointError: no record (a truncated file, or one this package
        did not write) or a record that cannot be parsed.
    :raises FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            raise DamagedCheckpointError(path, f"a directory without {STATE_FILE}")
        inner = read_info(path / STATE_FILE)
        if not inner.record.get("sharded"):
            raise DamagedCheckpointError(path, "its record does not describe a sharded one")
        return CheckpointInfo(path, inner.record, inner.covered_bytes)
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        window = min(size, _EOCD_SIZE + _MAX_COMMENT)
        file.seek(size - window)
        tail = file.read(window)
    # The end record's comment runs to the end of the file: find the signature
    # whose declared comment length matches exactly what follows it.
    position = tail.rfind(_EOCD_SIGNATURE)
    while position >= 0:
        if position + _EOCD_SIZE <= len(tail):
            length = int.from_bytes(tail[position + 20 : position + 22], "little")
            if position + _EOCD_SIZE + length == len(tail):
                break
        position = tail.rfind(_EOCD_SIGNATURE, 0, position)
    if position < 0:
        # A plain torch.save file ends with an end record and no comment; one of
        # ours that lost its end (truncation) does not.
        plain = tail[-_EOCD_SIZE : -_EOCD_SIZE + 4] == _EOCD_SIGNATURE and tail[-2:] == b"\0\0"
        raise DamagedCheckpointError(
            path, f"no zip end record with a hooktrain record ({size} bytes; truncated?)", plain
        )
    comment = tail[position + _EOCD_SIZE :]
    if not comment:
        raise DamagedCheckpointError(path, "it has no hooktrain record", plain=True)
    try:
        record = json.loads(comment.decode())
    except (UnicodeDecodeError, ValueError):
        raise DamagedCheckpointError(path, "no readable hooktrain record at its end") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DamagedCheckpointError(path, f"the record is not of format {FORMAT!r}")
    digest = record.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise DamagedCheckpointError(path, "the record holds no SHA-256 digest")
    return CheckpointInfo(path, record, size - len(comment))


def verify(info: CheckpointInfo) -> None:
    """Check the file's bytes against the digest in its record.

    :raises DamagedCheckpointError: they differ.
    """
    digest = hashlib.sha256()
    remaining = info.covered_bytes
    with open(info.path, "rb") as file:
        while remaining > 0:
            chunk = file.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    if remaining or digest.hexdigest() != info.record["sha256"]:
        raise DamagedCheckpointError(info.path, "its SHA-256 does not match its record")


def load_file(
    path: str | os.PathLike[str], *, require_record: bool = False
) -> tuple[dict[str, Any], CheckpointInfo | None]:
    """Verify and load a checkpoint with ``torch.load(..., weights_only=True)``.

    A file without a hooktrain record (a plain ``torch.save`` file) is loaded
    unverified, unless ``require_record``.

    :return: the checkpoint mapping, and the verified record (``None`` when the
        file had none).

    :raises DamagedCheckpointError: it fails verification or cannot be read.
    :raises UnsafeCheckpointError: it holds objects safe loading refuses.
    :raises ConfigurationError: it does not exist, or is not a checkpoint mapping.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(missing_checkpoint_message(os.fspath(path)))
    info: CheckpointInfo | None
    try:
        info = read_info(path)
    except DamagedCheckpointError as exc:
        if require_record or not exc.plain:
            raise
        info = None  # a plain torch.save file: loaded unverified
    if info is not None:
        verify(info)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(path, str(exc)) from None
    except Exception as exc:
        raise DamagedCheckpointError(
            path, f"torch.load failed: {type(exc).__name__}: {exc}"
        ) from exc
    from hooktrain.state import require_checkpoint

    require_checkpoint(loaded, os.fspath(path))
    return loaded, info
