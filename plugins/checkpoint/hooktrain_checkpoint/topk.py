"""Which ranked checkpoints to keep, and what their files are called."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hooktrain_checkpoint.storage import LAST_NAME, SUFFIX

__all__ = ["better", "enter", "ranked", "render_name"]

_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def render_name(pattern: str, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The file name (with ``.ckpt``) that ``pattern`` gives: each ``{key}`` or
    ``{key:format}`` becomes ``key=value``, the value taken from ``values`` (epoch,
    step) or else ``metrics``, and ``none`` when neither has it. A name that would
    be ``last`` becomes ``last-ranked``: ``last.ckpt`` is the newest state's."""

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
        return f"{key.replace('/', '_')}={text}"

    name = _FIELD.sub(render, pattern)
    if name == LAST_NAME:
        name += "-ranked"
    return name + SUFFIX


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
    scores: dict[str, float], name: str, score: float, keep: int, mode: str
) -> tuple[str | None, list[str]]:
    """Enter the checkpoint ``name`` scoring ``score`` into ``scores`` (file name to
    score of the checkpoints kept) if it belongs among the best ``keep`` (``-1``:
    all).

    :return: ``(name, evicted names)``, or ``(None, [])`` when it does not belong.
    """
    if name in scores or keep == -1 or len(scores) < keep:
        scores[name] = score
    else:
        worst = ranked(scores, mode)[-1]
        if not better(score, scores[worst], mode):
            return None, []
        scores[name] = score
    evicted: list[str] = []
    if keep != -1:
        while len(scores) > keep:
            worst = ranked(scores, mode)[-1]
            del scores[worst]
            evicted.append(worst)
    return name, evicted
