"""Batch-size-weighted means of the values of an epoch, summed on the device.

The loop records each step's loss, and every value logged inside a batch, with
:class:`RunningMeans`: appending to a list costs no device operation per step, and
the list is folded into a device-side sum every ``fold_every`` values and when the
means are read. `process_collectives` gives the operations over every process that
the means of a distributed epoch need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import PluginError

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["Collectives", "RunningMeans", "process_collectives"]


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

    def pending_finite(self, name: str) -> torch.Tensor | None:
        """Like `fold_finite`, without folding: whether the tensor values of ``name``
        added or folded since the last check are all finite (a 0-dim boolean tensor
        on the device), ``None`` when there are none. A checkpoint taken afterwards
        still holds the values unsummed, so that a resume sums them in the same
        groups as a run never interrupted."""
        checks = []
        total = self._sums.get(name)
        if name in self._unchecked and isinstance(total, torch.Tensor):
            checks.append(torch.isfinite(total).reshape(1))
        values = [v for v in self._pending.get(name, ([], []))[0] if isinstance(v, torch.Tensor)]
        if values:
            checks.append(torch.isfinite(torch.stack([v.reshape(()) for v in values])))
        return torch.cat(checks).all() if checks else None

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
        except RuntimeError:  # mixed shapes of one element each, or devices
            # (a metric computed on the CPU after a resume put the values restored
            # from its checkpoint on the training device): onto the latest's.
            device = values[-1].device
            stacked = torch.stack([v.reshape(()).to(device) for v in values])
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

    def fold(self, name: str) -> None:
        """Sum the pending values of ``name`` into its running sum, on the device."""
        if name in self._pending:
            self._fold(name)

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
        """Sums and weights: what a checkpoint taken mid-epoch needs.

        With one process the values not yet folded are kept as they are (those of
        a name, when all are tensors of one element, as one 1-D tensor of shape
        ``(values,)``; otherwise as a list), so that a resumed run folds them in
        the same groups as a run never interrupted and its means agree to the last
        bit: folded here, at a point the uninterrupted run does not fold, the
        float32 sums were grouped, and rounded, differently.

        With ``collectives`` (several processes) this is a collective call, as
        :meth:`compute` is: everything is folded, and the sums and weights are
        those of every process added together (agreed by name), marked
        ``"reduced"``, so that a checkpoint written by rank 0 holds the whole epoch
        so far, not rank 0's share of it.
        """
        if collectives is not None:
            self.fold_all()  # only sums are reduced over processes
        pending = {
            name: (_kept_values(values), list(weights))
            for name, (values, weights) in self._pending.items()
        }
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
                # A sum of Python numbers is a float64: kept so, not rounded to float32.
                n: (
                    s.detach().cpu()
                    if isinstance(s, torch.Tensor)
                    else torch.tensor(s, dtype=torch.float64)
                )
                for n, s in sums.items()
            },
            "weights": weights,
        }
        if pending:
            state["pending"] = pending
        if collectives is not None:
            state["reduced"] = True
            state["global_names"] = sorted(self.global_names)
        return state

    def load_state_dict(
        self, state: Mapping[str, Any], device: torch.device, *, rank: int = 0
    ) -> None:
        """Put back what :meth:`state_dict` returned, on ``rank`` 0 alone (names
        already gathered from every process excepted): the state holds the whole
        epoch so far, reduced over several processes or saved by one, so that the
        end-of-epoch reduction counts every sample once, whatever the number of
        processes now."""
        self.reset()
        shared = set(state.get("global_names", []))
        keep = rank == 0
        self._sums = {
            n: s.to(device) for n, s in state.get("sums", {}).items() if keep or n in shared
        }
        self._weights = {
            n: float(w) for n, w in state.get("weights", {}).items() if keep or n in shared
        }
        self.global_names = shared & set(self._sums)
        # Not checked finite by this run yet.
        self._unchecked = {n for n, total in self._sums.items() if isinstance(total, torch.Tensor)}
        for name, (values, weights) in state.get("pending", {}).items() if keep else ():
            if isinstance(values, torch.Tensor):
                values = list(values.to(device).unbind())
            else:
                values = [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]
            self._pending[name] = (values, list(weights))


def _kept_values(values: list[Any]) -> Any:
    """Pending values as a checkpoint keeps them: tensors of one element stacked
    into one tensor on the CPU (one record in the file, not one per value), which
    `RunningMeans.load_state_dict` unbinds again; anything else as a list, of
    tensors copied alone (not with the storage a view shares) and of numbers as
    Python floats (a NumPy float is a float, which loading with
    ``weights_only=True`` refuses in its own type)."""
    if values and all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in values):
        try:
            return torch.stack([v.detach().reshape(()) for v in values]).cpu()
        except RuntimeError:  # mixed dtypes or devices: kept one by one
            pass
    return [
        v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else float(v) for v in values
    ]
