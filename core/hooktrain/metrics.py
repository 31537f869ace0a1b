"""Metric values: kept on the device while training, read as floats when asked.

Converting a tensor to a Python number waits for the device. The loop therefore
only stores tensors; :class:`Metrics` converts a value the first time someone
reads it, and :class:`RunningMeans` folds a batch's values into device-side sums
(stateful metrics, ``torchmetrics.Metric``, live in `hooktrain.epoch_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.batches import STEP_NAMES
from hooktrain.errors import PluginError, closest_name, warn_user
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
    """``values`` as floats, every tensor among them read in one transfer."""
    tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read: dict[str, float] = {}
    if len(tensors) > 1:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in tensors])
        read = dict(zip(tensors, stacked.tolist(), strict=True))
    return {
        k: float(read[k] if k in read else v.item() if isinstance(v, torch.Tensor) else v)
        for k, v in values.items()
    }


@dataclass(frozen=True)
class Collectives:
    """The operations over every process that :meth:`RunningMeans.compute` needs.

    :ivar all_reduce: the sum of a tensor over every process.
    :ivar all_gather_object: a picklable object from every process, in rank order.
    :ivar device: where the tensors handed to ``all_reduce`` must be.
    :ivar rank: this process's rank (``trainer.global_rank``).
    """

    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    all_gather_object: Callable[[Any], list[Any]]
    device: torch.device
    rank: int = 0


def process_collectives(trainer: Trainer) -> Collectives | None:
    """``trainer``'s collectives (its ``all_reduce`` and ``all_gather_object``
    hooks), or ``None`` with one process, where there is nothing to reduce."""
    world_size = trainer.world_size
    if world_size == 1:
        return None

    def all_gather_object(obj: Any) -> list[Any]:
        hooks = trainer._hooks if trainer._hooks is not None else trainer.plugin_manager.hook
        gathered = hooks.all_gather_object(trainer=trainer, obj=obj)
        if gathered is None or len(gathered) != world_size:
            count = 0 if gathered is None else len(gathered)
            # Going on with the local names would reduce different tensors on
            # different processes: a hang, or sums of unrelated values.
            raise PluginError(
                f"all_gather_object returned {count} object(s) for world_size={world_size}: "
                f"the plugin that makes the run distributed must implement the "
                f"all_gather_object hook (hooktrain-accelerate does)"
            )
        return list(gathered)

    return Collectives(trainer.all_reduce, all_gather_object, trainer.device, trainer.global_rank)


class RunningMeans:
    """Batch-size-weighted means of named values, summed on the device.

    ``add`` only appends to a list; every ``fold_every`` values (and when the means
    are read) the pending values of a name are summed in one operation.
    """

    fold_every = 256

    def __init__(self) -> None:
        self._pending: dict[str, tuple[list[Any], list[float]]] = {}
        self._sums: dict[str, torch.Tensor | float] = {}
        self._weights: dict[str, float] = {}
        # Names with tensor values folded since their last ``fold_finite``.
        self._unchecked: set[str] = set()
        #: Names whose values were gathered from every process already.
        self.global_names: set[str] = set()

    def add(self, name: str, value: Any, weight: float) -> None:
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = ([], [])
        values, weights = pending
        values.append(value)
        weights.append(weight)
        if len(values) >= self.fold_every:
            self._fold(name)

    def extend(self, name: str, values: list[Any], weights: list[float]) -> None:
        """``add`` for each pair of ``values`` and ``weights``, in one call."""
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = ([], [])
        pending[0].extend(values)
        pending[1].extend(weights)
        if len(pending[0]) >= self.fold_every:
            self._fold(name)

    def fold_finite(self, name: str) -> torch.Tensor | None:
        """Fold the pending values of ``name`` and say, as a 0-dim boolean tensor left
        on the device, whether every tensor value of ``name`` folded since the last
        ``reset`` was finite; ``None`` when no tensor value was folded since the
        previous call. A caller that stops at the first ``False`` therefore learns
        that the culprit came after its previous call.

        NaN and infinity survive a sum with positive weights, so the running sum
        alone tells, and the check costs one operation rather than one per fold (a
        finite sum overflowing float32, beyond 3e38, would read as infinite too).
        """
        if name in self._pending:
            self._fold(name)
        if name not in self._unchecked:
            return None
        self._unchecked.discard(name)
        total = self._sums.get(name)
        return torch.isfinite(total) if isinstance(total, torch.Tensor) else None

    def _fold(self, name: str) -> None:
        values, weights = self._pending.pop(name)
        if not values:
            return
        # Folding runs at every log interval, so its operations are counted: each
        # costs microseconds on a CPU, against a step of a few hundred. 0-dim values
        # (the loss) stack as they are; looking at each one's type or shape first
        # would cost more than the stack itself.
        try:
            stacked: torch.Tensor | None = torch.stack(values)
        except TypeError:  # numbers among them
            stacked = None
        except RuntimeError:  # mixed shapes of one element each
            stacked = torch.stack([v.reshape(()) for v in values])
        if stacked is not None:
            if stacked.ndim != 1:
                stacked = stacked.reshape(-1)
            first = weights[0]
            # Half-precision losses (amp) are summed in float32; float64 ones (a
            # float64 model) keep their precision.
            dtype = torch.promote_types(stacked.dtype, torch.float32)
            total: torch.Tensor | float
            if weights.count(first) == len(weights):  # one batch size throughout
                total = stacked.sum(dtype=dtype)
                if first != 1:
                    total = total * first
            else:
                stacked = stacked.to(dtype)
                total = stacked @ torch.tensor(weights, dtype=dtype, device=stacked.device)
            self._unchecked.add(name)
        else:
            total = sum(float(v) * w for v, w in zip(values, weights, strict=True))
        previous = self._sums.get(name)
        self._sums[name] = total if previous is None else previous + total
        self._weights[name] = self._weights.get(name, 0.0) + float(sum(weights))

    def fold_all(self) -> None:
        for name in list(self._pending):
            self._fold(name)

    def compute(self, collectives: Collectives | None = None) -> dict[str, Any]:
        """The weighted mean of every name, as 0-dim tensors (or floats for names
        that only ever received numbers).

        With ``collectives`` (several processes), this is a collective call: every
        process must make it at the same point, whatever it logged, nothing
        included. The processes first agree on the names (one
        ``all_gather_object`` of the sorted names), then sum each name's weighted
        sum and weight over the processes in one ``all_reduce`` of a float64
        tensor of shape ``(2 * names,)``. A process that never logged a name adds
        zero to both, so that name's mean is taken over the processes that logged
        it, and every process returns every name. Names in ``global_names`` (already
        gathered from every process) are not reduced again.

        :raises PluginError: from ``collectives.all_gather_object`` when it does not
            return one object per process.
        """
        self.fold_all()
        means: dict[str, Any] = {}
        if collectives is not None:
            local = sorted(n for n in self._sums if n not in self.global_names)
            # Reducing by position is only right if every process packs the same
            # names in the same order; a name seen by some processes only (an
            # uneven split, a value logged conditionally) would shift the rest.
            names = sorted(set().union(*collectives.all_gather_object(local)))
            if names:
                device = collectives.device
                zero = torch.zeros((), dtype=torch.float64, device=device)
                sums = [
                    torch.as_tensor(self._sums[n], dtype=torch.float64, device=device)
                    if n in self._sums and n not in self.global_names
                    else zero
                    for n in names
                ]
                weights = [
                    0.0 if n in self.global_names else self._weights.get(n, 0.0) for n in names
                ]
                packed = torch.cat(
                    [
                        torch.stack(sums),
                        torch.tensor(weights, dtype=torch.float64, device=device),
                    ]
                )
                reduced = collectives.all_reduce(packed)
                totals, counts = reduced[: len(names)], reduced[len(names) :]
                values = torch.where(counts > 0, totals / counts, totals)
                for i, name in enumerate(names):
                    if name not in self.global_names:
                        means[name] = values[i]
        for name, total in self._sums.items():
            if name not in means:
                means[name] = total / self._weights[name] if self._weights[name] else total
        return means

    def names(self) -> set[str]:
        """Every name added since the last reset."""
        return set(self._sums) | set(self._pending)

    def reset(self) -> None:
        self._pending.clear()
        self._sums.clear()
        self._weights.clear()
        self._unchecked.clear()
        self.global_names.clear()

    def state_dict(self, collectives: Collectives | None = None) -> dict[str, Any]:
        """Folded sums and weights: what a checkpoint taken mid-epoch needs.

        With ``collectives`` (several processes) this is a collective call, as
        :meth:`compute` is: the sums and weights are those of every process added
        together (agreed by name), marked ``"reduced"``, so that a checkpoint
        written by rank 0 holds the whole epoch so far, not rank 0's share of it.
        """
        self.fold_all()
        sums = dict(self._sums)
        weights = dict(self._weights)
        if collectives is not None:
            local = sorted(n for n in self._sums if n not in self.global_names)
            names = sorted(set().union(*collectives.all_gather_object(local)))
            if names:
                device = collectives.device
                packed = torch.tensor(
                    [float(self._sums.get(n, 0.0)) for n in names]
                    + [self._weights.get(n, 0.0) for n in names],
                    dtype=torch.float64,
                    device=device,
                )
                reduced = collectives.all_reduce(packed)
                for i, name in enumerate(names):
                    sums[name] = reduced[i]
                    weights[name] = float(reduced[len(names) + i])
        state: dict[str, Any] = {
            "sums": {
                n: (s.detach().cpu() if isinstance(s, torch.Tensor) else torch.tensor(s))
                for n, s in sums.items()
            },
            "weights": weights,
        }
        if collectives is not None:
            state["reduced"] = True
            state["global_names"] = sorted(self.global_names)
        return state

    def load_state_dict(
        self, state: Mapping[str, Any], device: torch.device, *, rank: int = 0
    ) -> None:
        """Put back what :meth:`state_dict` returned. A state ``"reduced"`` over
        several processes goes to ``rank`` 0 alone (names already gathered from
        every process excepted), so that the end-of-epoch reduction counts every
        sample once, whatever the number of processes now."""
        self.reset()
        shared = set(state.get("global_names", []))
        keep = rank == 0 or not state.get("reduced")
        self._sums = {
            n: s.to(device) for n, s in state.get("sums", {}).items() if keep or n in shared
        }
        self._weights = {
            n: float(w) for n, w in state.get("weights", {}).items() if keep or n in shared
        }
        self.global_names = shared & set(self._sums)


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
