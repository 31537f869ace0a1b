"""Which ranked checkpoints to keep, and what their files are called."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from hooktrain.errors import ConfigurationError, missing_monitor_hint
from hooktrain_checkpoint.storage import LAST_NAME, SUFFIX

__all__ = [
    "better",
    "check_pattern",
    "check_ranking",
    "enter",
    "missing_monitor_message",
    "never_ranked_message",
    "ranked",
    "render_name",
]

_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def check_ranking(mode: Any, save_top_k: Any) -> None:
    """:raises ConfigurationError: for a ``mode`` other than ``"min"`` and ``"max"``,
    or a ``save_top_k`` that is not an integer >= -1."""
    if mode not in ("min", "max"):
        raise ConfigurationError(f"checkpoint: mode must be 'min' or 'max', not {mode!r}")
    if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
        raise ConfigurationError(
            f"checkpoint: save_top_k must be an integer >= -1, got {save_top_k!r}"
        )


def check_pattern(pattern: str) -> None:
    """:raises ConfigurationError: for a ``filename`` pattern that is empty or holds
    a directory separator outside its fields, has a brace that opens or closes no
    field, or a format that the field's value (an integer for ``epoch`` and
    ``step``, a float for a metric) refuses; found here, not at the first save, an
    epoch into the run."""
    outside_fields = _FIELD.sub("", pattern)
    # Inside a field a "/" is usually a metric's (val_loss/dataloader_idx_0); what
    # a field renders is written with "_" for it (render_name).
    if not pattern or "/" in outside_fields or os.sep in outside_fields:
        raise ConfigurationError(
            f"checkpoint: filename must be a plain name pattern, without a directory "
            f"separator outside its fields, got {pattern!r}"
        )
    if "{" in outside_fields or "}" in outside_fields:
        raise ConfigurationError(
            f"checkpoint: filename {pattern!r} has a brace that opens or closes no field; "
            f"write fields as {{epoch}} or {{val_loss:.3f}}"
        )
    for match in _FIELD.finditer(pattern):
        key, spec = match.group(1).strip(), match.group(2)
        sample: Any = 0 if key in ("epoch", "step") else 0.5
        try:
            format(sample, spec or "")
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"checkpoint: filename field {match.group(0)!r} has a format its value "
                f"({type(sample).__name__}) refuses: {exc}"
            ) from None


def render_name(pattern: str, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The file name (with ``.ckpt``) that ``pattern`` gives: each ``{key}`` or
    ``{key:format}`` becomes ``key=value``, the value taken from ``values`` (epoch,
    step) or else ``metrics``, and ``none`` when neither has it; a directory
    separator in it (a per-loader metric's name, a format's fill) becomes ``_``. A
    name that would be ``last`` becomes ``last-ranked``: ``last.ckpt`` is the newest
    state's."""

    def render(match: re.Match[str]) -> str:
        key, spec = match.group(1).strip(), match.group(2)
        value: Any = values.get(key)
        if value is None and key in metrics:
            value = metrics[key]
        if value is None:
            text = "none"  # a metric that does not exist yet at this save
        elif spec:
            text = format(value, spec)
        else:
            text = str(value)
        return f"{key}={text}".replace("/", "_").replace(os.sep, "_")

    name = _FIELD.sub(render, pattern)
    if name == LAST_NAME:
        name += "-ranked"
    return name + SUFFIX


def missing_monitor_message(monitor: str, metrics: Mapping[str, Any], where: str) -> str:
    """What to say when ``monitor`` is not among ``metrics`` at a save (at ``where``).
    Called only where its value was due: a validation metric after a validation of
    the weights being saved."""
    hint = missing_monitor_hint(monitor, metrics)
    hint = f" {hint}" if hint else ""
    return (
        f"hooktrain-checkpoint: monitored metric {monitor!r} does not exist at {where}; "
        f"checkpoints are not ranked until it does (last is still saved).{hint} Known "
        f"metrics: {', '.join(sorted(metrics)) or 'none'}"
    )


def never_validated_message(monitor: str | None, why: str | None) -> str | None:
    """What to say when ``monitor`` is a validation metric and the fit never
    validates, ``why`` saying how (`hooktrain.options.why_fit_never_validates`);
    ``None`` otherwise."""
    if why is None or monitor is None or not monitor.startswith("val_"):
        return None
    return (
        f"hooktrain-checkpoint: monitor={monitor!r} is a validation metric, but {why}: no "
        f"checkpoint of this fit will be ranked (last.ckpt is still saved)"
    )


def never_ranked_message(
    monitor: str | None, every_n_epochs: int | None, val_every_n_steps: int | None
) -> str | None:
    """What to say when no save of a fit can be ranked: a validation metric ranks
    only validated weights, and step-wise saves alone are validated only with
    ``val_every_n_steps``. ``None`` when some can be."""
    if monitor is None or not monitor.startswith("val_") or every_n_epochs is not None:
        return None
    if val_every_n_steps is not None:
        return None
    return (
        f"hooktrain-checkpoint: monitor={monitor!r} ranks only weights that were validated, "
        f"and the step-wise saves come between validations: no checkpoint of this fit will "
        f"be ranked (last.ckpt is still saved). Add every_n_epochs=1 to rank each epoch "
        f"after its validation, or validate with val_every_n_steps"
    )


def better(a: float, b: float, mode: str) -> bool:
    """Whether score ``a`` is better than ``b`` (``mode`` ``"min"`` or ``"max"``).
    NaN is never better than anything: a diverged run must not evict good files."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if mode == "min" else a > b


def ranked(scores: Mapping[str, float], mode: str) -> list[str]:
    """The names in ``scores``, best first, NaN last."""
    nan_last = [name for name, score in scores.items() if math.isnan(score)]
    finite = sorted(
        (name for name, score in scores.items() if not math.isnan(score)),
        key=lambda name: scores[name],
        reverse=mode == "max",
    )
    return finite + nan_last


def enter(
    scores: dict[str, float],
    name: str,
    score: float,
    keep: int,
    mode: str,
    *,
    steps: dict[str, int],
    step: int,
) -> tuple[str | None, list[str]]:
    """Enter a checkpoint scoring ``score`` into ``scores`` (file name to score of
    the checkpoints kept) if it belongs among the best ``keep`` (``-1``: all).

    Whether it belongs depends on its score alone. Its file is ``name``, unless a
    checkpoint that stays kept has that name: then the first free of ``name-v1``,
    ``name-v2``, ... (before ``.ckpt``), so that no kept file is ever overwritten
    by the save of another step, least of all a better one by a worse one. A name
    that only an evicted checkpoint held is free: the new file replaces it.

    :param steps: file name to global step of the checkpoints kept; kept in step
        with ``scores``. A kept checkpoint of the same global step as this one
        (``step``) holds the same weights (saved again at the epoch's end, after a
        step-wise save of its last batch): the new save is ranked in its place,
        rescored. It takes the file when ``name`` (or a version of it) is its name,
        and otherwise evicts it, since a name with a metric in it would show the
        old score.
    :return: ``(file name, evicted names)``, or ``(None, [])`` when it does not
        belong (``scores`` and ``steps`` are then unchanged).
    """
    if keep == 0:
        return None, []
    stem = name.removesuffix(SUFFIX)
    previous = next((kept for kept in scores if steps.get(kept) == step), None)
    others = {kept: value for kept, value in scores.items() if kept != previous}
    evicted: list[str] = []
    if keep != -1 and len(others) >= keep:
        order = ranked(others, mode)
        if not better(score, others[order[-1]], mode):
            return None, []
        # The worst go, so that the best ``keep`` remain, the new one among them
        # (more than one when a resumed run keeps fewer than the saved ranking).
        evicted = order[keep - 1 :]
    if previous is not None:
        evicted.append(previous)  # its file is taken over below, or removed
    if previous is not None and _version_of(previous, stem):
        name = previous
    else:
        taken = set(others) - set(evicted)
        version = 0
        while name in taken:
            version += 1
            name = f"{stem}-v{version}{SUFFIX}"
    for old in evicted:
        del scores[old]
        steps.pop(old, None)
    scores[name] = score
    steps[name] = step
    return name, evicted


def _version_of(name: str, stem: str) -> bool:
    """Whether ``name`` is ``stem.ckpt`` or ``stem-v<n>.ckpt``."""
    base = name.removesuffix(SUFFIX)
    if base == stem:
        return True
    version = base.removeprefix(stem + "-v")
    return base.startswith(stem + "-v") and version.isdigit()
