"""The exceptions hooktrain raises itself, and its one warning category. Each
message says what to do next, most with the closest name to a misspelt one."""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable


class HooktrainError(Exception):
    """Base class of every error hooktrain raises on purpose."""


class PluginError(HooktrainError):
    """A plugin cannot be found, loaded, constructed or registered."""


class ConfigurationError(HooktrainError, ValueError):
    """The trainer, a dataloader, the model or a loss is not usable as given."""


class HookError(HooktrainError):
    """A plugin's hook implementation raised; the original is ``__cause__``.

    :ivar plugin: the registered name of the plugin that raised.
    :ivar hook: the name of the hook.
    """

    def __init__(self, message: str, *, plugin: str, hook: str) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class NonFiniteLossError(HooktrainError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ResumeWarning(UserWarning):
    """A run resumed in the middle of an epoch may not replay the interrupted one
    exactly: its data order or its random numbers may differ (the dataloader is not
    the one checkpointed, it cannot be replayed, or the checkpoint is older).

    Make it an error where a resume must be exact::

        warnings.simplefilter("error", hooktrain.ResumeWarning)
    """


def closest_name(given: object, known: Iterable[str]) -> str | None:
    """The name of ``known`` closest to ``given`` (difflib's ratio of at least 0.5),
    for the "did you mean" of a message; ``None`` when none is close.

    With several validation dataloaders a metric is logged once per loader
    (``val_loss/dataloader_idx_0``...): the first of those is the closest to the
    bare name, which difflib would rank below a shorter near miss (``loss``).
    Lightning users log the training loss as ``train_loss``, where hooktrain's is
    ``loss``: a ``train_`` name whose rest is known is that name (difflib's choice
    was ``val_loss``).
    """
    known = list(known)
    per_loader = [name for name in known if name.startswith(f"{given}/dataloader_idx_")]
    if per_loader:
        return min(per_loader)
    bare = str(given).removeprefix("train_")
    if bare != given and bare in known:
        return bare
    matches = difflib.get_close_matches(str(given), list(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def missing_monitor_hint(monitor: str, computed: Iterable[str]) -> str:
    """The sentence that ends a "monitored metric missing" message, for a monitor
    read where its value was due (after a validation of the weights, for a ``val_*``
    one): the validation step's fault when validation computed no ``val_*`` metric at
    all, else the closest computed name; ``""`` when there is nothing to suggest."""
    names = list(computed)
    if monitor.startswith("val_") and not any(name.startswith("val_") for name in names):
        return (
            "Validation ran and computed no metric: return the loss (or a dict of "
            "values) from validation_step, or log values with trainer.log."
        )
    close = closest_name(monitor, names)
    return f"Did you mean {close!r}?" if close else ""


def missing_checkpoint_message(ckpt_path: str) -> str:
    """The error for a ``ckpt_path`` naming no file. A bare word (Lightning's
    ``"best"``) is told what names ``ckpt_path`` takes."""
    message = f"checkpoint {ckpt_path!r} does not exist"
    if ckpt_path.isidentifier():
        message += (
            "; ckpt_path takes a file's path, or 'last' with a plugin that keeps "
            "checkpoints. For the best-ranked one pass its path (the checkpoint "
            "plugin's best_model_path)"
        )
    return message


def _internal(module: str) -> bool:
    return module.partition(".")[0] in ("hooktrain", "pluggy") or module.startswith("hooktrain_")


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` shown at the first line outside hooktrain,
    its first-party plugins (modules ``hooktrain_*``) and pluggy: the user's
    ``fit(...)`` or ``Trainer(...)`` line, however deep in the loop or in a hook the
    cause was found. (Python 3.12's ``skip_file_prefixes`` does this by path; it is
    not in 3.11.) A fixed ``stacklevel`` pointed into the loop or into pluggy
    whenever the call depth changed.
    """
    frame = sys._getframe(1)
    level = 2  # warnings.warn's count: 1 is this function, 2 its caller
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
