"""The errors of reading a checkpoint file: damaged, or unsafe to load."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hooktrain.errors import ConfigurationError

__all__ = ["DamagedCheckpointError", "UnsafeCheckpointError"]


class DamagedCheckpointError(ConfigurationError):
    """The file is truncated, altered, or was never completely written.

    :ivar path: the file.
    :ivar reason: what is wrong with it.
    :ivar plain: the file is an intact-looking zip archive without any comment,
        as ``torch.save`` writes: not damaged, just not written by this package.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, plain: bool = False) -> None:
        super().__init__(f"checkpoint {os.fspath(path)!r} is damaged: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.plain = plain


class UnsafeCheckpointError(ConfigurationError):
    """The file holds pickled objects that safe loading refuses (code could run).

    ``detail`` is the unpickler's refusal; of torch's, only the line naming what
    it refused is kept.

    :ivar path: the file.
    """

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        super().__init__(
            f"refusing to load checkpoint {os.fspath(path)!r}: it holds objects that "
            f"torch.load(weights_only=True) does not allow, so unpickling it could run "
            f"code. Nothing from it was executed. Detail: {_what_was_refused(detail)}"
        )
        self.path = Path(path)


def _what_was_refused(message: str) -> str:
    """Of torch's weights-only refusal, the sentence naming what it refused (the
    rest is advice on loading the file unsafely), without its terminal colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in message.splitlines()]
    named = [line for line in lines if "Unsupported global" in line or "Unpickler error" in line]
    found = named[0] if named else next((line for line in lines if line), "")
    return found.split(" Please use ")[0]
