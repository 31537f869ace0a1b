"""hooktrain-checkpoint: atomic, verified checkpoints and exact resume for hooktrain.

Select it with ``Trainer(plugins=[("checkpoint", {"dirpath": "ckpts"})])`` and
resume with ``trainer.fit(..., ckpt_path="last")``. See ``docs/checkpointing.md``.
"""

from __future__ import annotations

from hooktrain_checkpoint.discovery import list_checkpoints, newest_checkpoint
from hooktrain_checkpoint.errors import DamagedCheckpointError, UnsafeCheckpointError
from hooktrain_checkpoint.plugin import ModelCheckpoint
from hooktrain_checkpoint.storage import CheckpointInfo, load_file, read_info
from hooktrain_checkpoint.writer import CheckpointWriteError, snapshot

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "ModelCheckpoint",
    "UnsafeCheckpointError",
    "__version__",
    "list_checkpoints",
    "load_file",
    "newest_checkpoint",
    "read_info",
    "snapshot",
]
