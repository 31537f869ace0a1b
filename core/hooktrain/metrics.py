"""Metric values: kept on the device while training, read as floats when asked.

Converting a tensor to a Python number waits for the device. The loop therefore
only stores tensors; :class:`Metrics` converts a value the first time someone
reads it. The epoch's running means live in `hooktrain.running_means`, and
stateful metrics (``torchmetrics.Metric``) in `hooktrain.epoch_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.batches import STEP_NAMES
from hooktrain.errors import closest_name, warn_user
from hooktrain.publishing import LOADER_SUFFIX, stage_name

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose predicted class equals the target class.

    :param outputs: scores of shape ``(batch, classes)``, the class being the
        highest-scoring one; or, for a binary problem, logits of shape ``(batch,)``
        or ``(batch, 1)`` (a one-unit output trained with
        ``binary_cross_entropy_with_logits``), the class being 1 where the logit is
        above 0. Probabilities (after a sigmoid) are not logits: use a threshold of
        0.5 yourself, or torchmetrics' ``BinaryAccuracy``.
    :param targets: class indices of shape ``(batch,)`` or ``(batch, 1)`` (any
        integer or float dtype holding 0, 1, ...), or one-hot / probability rows
        of the same shape as ``(batch, classes)`` scores.
    :return: a 0-dim float32 tensor on the outputs' device.
    :raises ValueError: when the targets' shape is none of these (checked on
        shapes only: nothing is read from the device).
    """
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        # An argmax over a single column is always 0: every row would count as
        # class 0, and (batch, 1) targets as class 0 too, an accuracy of 1.0.
        predicted = (outputs > 0).long()
        if outputs.ndim > 1:
            predicted = predicted.squeeze(-1)
        if targets.ndim == predicted.ndim + 1 and targets.shape[-1] == 1:
            targets = targets.squeeze(-1)
    else:
        predicted = outputs.argmax(dim=-1)
        if targets.ndim == outputs.ndim:
            # (batch, 1) holds class indices (Keras's sparse labels); an argmax
            # over its one column would make every target class 0.
            if targets.shape[-1] == 1:
                targets = targets.squeeze(-1)
            elif targets.shape == outputs.shape:
                targets = targets.argmax(dim=-1)
    if targets.shape != predicted.shape:
        # Broadcasting would compare every prediction with every target.
        raise ValueError(
            f"accuracy: targets of shape {tuple(targets.shape)} do not fit outputs of "
            f"shape {tuple(outputs.shape)}; see hooktrain.accuracy for the shapes it takes"
        )
    return (predicted == targets).float().mean()


class Metrics(Mapping[str, float]):
    """The latest value of every metric, read as Python floats.

    Values are stored as given (often 0-dim tensors still on the device) and
    converted on first read, so storing costs no synchronisation.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> float:
        """:raises KeyError: for a name never computed, naming the closest one (with
        several validation loaders, ``val_loss`` is ``val_loss/dataloader_idx_0``...)."""
        try:
            value = self._values[name]
        except KeyError:
            close = closest_name(name, self._values)
            hint = f"; did you mean {close!r}?" if close else ""
            raise KeyError(
                f"{name!r} is not among the metrics{hint} (known: "
                f"{', '.join(sorted(self._values)) or 'none'})"
            ) from None
        if not isinstance(value, float):
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            self._values[name] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._values else default

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Metrics({ {k: self[k] for k in self._values} })"

    def __setitem__(self, name: str, value: Any) -> None:
        # A Lightning user writes callback_metrics[name] = value; here a value goes
        # through trainer.log, which weighs it into the epoch's mean and publishes it.
        raise TypeError(
            f"trainer.metrics is read-only: log {name!r} with trainer.log({name!r}, value) "
            f"instead, which also averages it over the epoch and hands it to the loggers"
        )

    def set(self, name: str, value: Any) -> None:
        """Store a value (a number or a tensor) without converting it."""
        self._values[name] = value

    def update_raw(self, values: Mapping[str, Any]) -> None:
        self._values.update(values)

    def raw(self, name: str) -> Any:
        """The stored value, unconverted."""
        return self._values[name]

    def floats(self, names: Any = None) -> dict[str, float]:
        """Floats for ``names`` (all when ``None``), converting every tensor in one
        transfer rather than one per value; the converted values are kept."""
        keys = list(self._values) if names is None else [n for n in names if n in self._values]
        converted = _as_floats({k: self._values[k] for k in keys})
        self._values.update(converted)
        return converted

    def snapshot_floats(self) -> dict[str, float]:
        """Floats for every value, converted from a copy (taken in one step) and not
        kept: safe to call from another thread while the loop stores new values."""
        return _as_floats(self._values.copy())

    def clear(self) -> None:
        self._values.clear()


def _as_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """``values`` as floats, each the value ``float(tensor.item())`` gives: the
    tensors of one device and dtype are read in one transfer, stacked as they are
    (a float64 or int64 value cast to float32 for the stack would lose digits, and
    tensors on two devices cannot be stacked)."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault((value.device, value.dtype), []).append(key)
    read: dict[str, float] = {}
    for keys in groups.values():
        if len(keys) > 1:
            stacked = torch.stack([values[k].detach().reshape(()) for k in keys])
            read.update(zip(keys, stacked.tolist(), strict=True))
    return {
        k: float(read[k] if k in read else v.item() if isinstance(v, torch.Tensor) else v)
        for k, v in values.items()
    }


def warn_if_metrics_unused(
    trainer: Trainer, computed: Iterable[str], prefix: str, stage: str
) -> None:
    """Warn when ``metrics=`` were given but a stage's epoch computed none of them.

    A model's own step that returns only its loss gives the metrics nothing to
    compute on, and an epoch without them looks like a run that has none. Warned
    once per place in the code (Python's default warning filter).
    """
    wanted = {stage_name(name, prefix) for name in trainer.metric_fns}
    if not wanted or any(name.split(LOADER_SUFFIX)[0] in wanted for name in computed):
        return
    step = STEP_NAMES[stage]
    warn_user(
        f"hooktrain: metrics= ({', '.join(trainer.metric_fns)}) computed nothing in "
        f"{stage}: the model's {step} returned no 'outputs' and 'targets' for them. Return "
        f"{{'loss': loss, 'outputs': outputs, 'targets': targets}} from {step}, or log "
        f"the values yourself with trainer.log",
    )
