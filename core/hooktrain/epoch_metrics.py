"""Stateful metrics: a ``metrics=`` value that is updated every batch and computed
once at the epoch's end.

Precision, recall, F1 or AUROC over an epoch are not the mean of their values on
each batch. A ``torchmetrics.Metric`` (or any object with ``update``, ``compute``
and ``reset``) therefore keeps its state over the epoch: each stage, and each
evaluation dataloader, updates a private copy, so that ``f1``, ``val_f1`` and
``val_f1/dataloader_idx_1`` never share state, and the user's own object is
never touched. torchmetrics itself is not imported here: it is an optional
dependency (``pip install hooktrain[metrics]``).

With several processes a copy is combined with the other processes' copies in
one collective at the epoch's end, unless its updates already saw every
process's outputs (``gather_for_metrics``, which also drops the samples a
distributed sampler repeats to pad the last batch).
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from hooktrain.errors import ConfigurationError, PluginError
from hooktrain.running_means import Collectives

__all__ = ["EpochMetrics", "is_epoch_metric"]


def is_epoch_metric(value: Any) -> bool:
    """Whether a ``metrics=`` value keeps state over an epoch (it has callable
    ``update``, ``compute`` and ``reset``, as a ``torchmetrics.Metric`` has) rather
    than being a function of one batch."""
    return all(callable(getattr(value, name, None)) for name in ("update", "compute", "reset"))


def _never_distributed() -> bool:
    # Given to each copy as torchmetrics' distributed_available_fn: the copies are
    # combined here, through the trainer's collectives; a sync of torchmetrics' own
    # in compute() would count the other processes a second time. A module-level
    # function, so that copies stay picklable for all_gather_object.
    return False


class EpochMetrics:
    """The stateful metrics of one stage, or of one evaluation dataloader.

    :param templates: the ``metrics=`` mapping; its stateful values are copied
        (``copy.deepcopy``, moved to ``device`` when they have ``to``, then
        ``reset``), the plain functions are left out.
    :param device: where the outputs they are updated with live.
    :param world_size: the number of processes. With more than one, every metric
        must have ``merge_state(other)`` (torchmetrics' metrics with
        ``full_state_update=False`` do).
    :raises ConfigurationError: for a metric that cannot be combined over
        processes, when ``world_size > 1``.
    """

    def __init__(self, templates: Mapping[str, Any], device: torch.device, world_size: int) -> None:
        self._metrics: dict[str, Any] = {}
        for name, template in templates.items():
            if not is_epoch_metric(template):
                continue
            metric = copy.deepcopy(template)
            if callable(getattr(metric, "to", None)):
                metric = metric.to(device)
            if hasattr(metric, "distributed_available_fn"):
                metric.distributed_available_fn = _never_distributed
            if callable(getattr(metric, "persistent", None)):
                metric.persistent(True)  # torchmetrics: its states join state_dict()
            metric.reset()
            if world_size > 1:
                _check_mergeable(name, metric)
            self._metrics[name] = metric
        self._device = device
        #: Batches this process updated the metrics with since the last reset.
        self.updates = 0
        #: Whether those updates saw the outputs of every process (gathered).
        self.gathered = False

    def __bool__(self) -> bool:
        return bool(self._metrics)

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def update(self, outputs: Any, targets: Any) -> None:
        """``update(outputs, targets)`` of every metric: one batch, no host sync."""
        for name, metric in self._metrics.items():
            try:
                metric.update(outputs, targets)
            except Exception as exc:
                note_failing_metric(exc, name, outputs, targets)
                raise
        self.updates += 1

    def compute(self, collectives: Collectives | None) -> dict[str, Any]:
        """Each metric's value over every update since the last reset, as given by
        its ``compute`` (a 0-dim tensor for torchmetrics), or ``{}`` when no process
        updated them.

        With ``collectives`` (several processes) this is a collective call: every
        process makes it at the same point, and all return the same values. Copies
        fed gathered outputs hold the same state on every process and are computed
        as they are; otherwise one ``all_gather_object`` brings every process's
        state, and this process's copy is merged with the others'
        (``merge_state``) into a fresh copy, so its own state stays as it was.

        :raises ConfigurationError: when a metric's value is not a single number.
        :raises PluginError: when some processes gathered their outputs and others
            did not.
        """
        if not self._metrics:
            return {}
        metrics = self._metrics
        if collectives is not None:
            metrics, _ = self._combined(collectives)
        elif not self.updates:
            return {}
        if metrics is None:
            return {}
        values: dict[str, Any] = {}
        for name, metric in metrics.items():
            value = _compute(metric)
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ConfigurationError(
                        f"metric {name!r} computed a tensor of shape {tuple(value.shape)}; a "
                        f"metrics= value must compute one number (for per-class values, use "
                        f"one metric per class or an average)"
                    )
                value = value.detach().reshape(())
            elif not isinstance(value, numbers.Real):
                raise ConfigurationError(
                    f"metric {name!r} computed a {type(value).__name__}, not a number; a "
                    f"metrics= value must compute one number (for a MetricCollection, give "
                    f"each of its metrics its own name in metrics=)"
                )
            values[name] = value
        return values

    def _combined(self, collectives: Collectives) -> tuple[dict[str, Any] | None, int]:
        """Every process's metrics merged (``None`` when no process updated them),
        and the number of updates of every process added together."""
        own = None if self.gathered else {n: _on_cpu(m) for n, m in self._metrics.items()}
        everyone = collectives.all_gather_object((self.gathered, self.updates, own))
        total = sum(updates for _, updates, _ in everyone)
        if not total:
            return None, 0
        gathered = {flag for flag, updates, _ in everyone if updates}
        if gathered == {True}:
            return self._metrics, total
        if len(gathered) > 1:
            raise PluginError(
                "some processes updated their metrics with outputs gathered from every "
                "process (gather_for_metrics) and others with their own: the plugin "
                "implementing gather_for_metrics must gather on every process or on none"
            )
        combined = {}
        for name, metric in self._metrics.items():
            merged = copy.deepcopy(metric)
            for rank, (_, updates, states) in enumerate(everyone):
                if rank != collectives.rank and updates:
                    other = states[name]
                    merged.merge_state(other.to(self._device) if hasattr(other, "to") else other)
            combined[name] = merged
        return combined, total

    def reset(self) -> None:
        for metric in self._metrics.values():
            metric.reset()
        self.updates = 0
        self.gathered = False

    def state_dict(self, collectives: Collectives | None = None) -> dict[str, Any]:
        """Each metric's ``state_dict()`` (tensors moved to the CPU), for a checkpoint
        taken in the middle of an epoch. A metric without ``state_dict`` is left
        out: a run resumed from that checkpoint computes it over the batches after
        the resume only.

        With ``collectives`` (several processes) this is a collective call, as
        :meth:`compute` is: the states are those of every process merged, marked
        ``"reduced"``, so that the checkpoint holds the whole epoch so far, and a
        resume on any number of processes counts each batch once.
        """
        metrics: Mapping[str, Any] | None = self._metrics
        updates = self.updates
        if collectives is not None and self._metrics:
            metrics, updates = self._combined(collectives)
        states: dict[str, Any] = {
            name: _cpu_tensors(metric.state_dict())
            for name, metric in (metrics or {}).items()
            if callable(getattr(metric, "state_dict", None))
        }
        return {"updates": updates, "metrics": states, "reduced": collectives is not None}

    def load_state_dict(self, state: Mapping[str, Any], *, rank: int = 0) -> None:
        """Put back what :meth:`state_dict` returned, on ``rank`` 0 alone: the state
        holds the whole epoch so far (reduced over several processes, or saved by
        one), so the others start empty, and the merge at the epoch's end counts
        every batch once, whatever the number of processes now."""
        self.reset()
        if rank != 0:
            return
        for name, metric_state in state.get("metrics", {}).items():
            metric = self._metrics.get(name)
            if metric is not None and callable(getattr(metric, "load_state_dict", None)):
                metric.load_state_dict(metric_state)
                if callable(getattr(metric, "to", None)):
                    metric.to(self._device)  # torchmetrics sets loaded states as they come
        self.updates = int(state.get("updates", 0))


def _compute(metric: Any) -> Any:
    """``metric.compute()``, called when this process or another updated it."""
    if getattr(metric, "update_count", None) != 0:
        return metric.compute()
    with warnings.catch_warnings():
        # torchmetrics counts only its own update() calls: a state restored from a
        # checkpoint or merged from other processes has none, and it warns of a
        # compute before any update. (Only here: a filter change makes every
        # once-only warning show again, the metric's own included.)
        warnings.filterwarnings(
            "ignore", message=r"The ``compute`` method of metric .* before the ``update``"
        )
        return metric.compute()


def _check_mergeable(name: str, metric: Any) -> None:
    merge = getattr(metric, "merge_state", None)
    problem = None if callable(merge) else "it has no merge_state method"
    if problem is None:
        try:
            # Two empty copies: torchmetrics refuses a metric it cannot merge
            # (full_state_update) before looking at any state.
            copy.deepcopy(metric).merge_state(copy.deepcopy(metric))
        except (RuntimeError, NotImplementedError) as exc:
            problem = str(exc)
    if problem is not None:
        raise ConfigurationError(
            f"metrics={{{name!r}: ...}} cannot be combined over processes: {problem}. "
            f"With several processes a stateful metric needs merge_state(other) (torchmetrics "
            f"metrics with full_state_update=False have it; a custom torchmetrics Metric can "
            f"set full_state_update = False or override merge_state)"
        )


def _on_cpu(metric: Any) -> Any:
    """A copy of ``metric`` whose tensors are on the CPU, to be pickled: CUDA tensors
    would be unpickled onto the sending process's GPU index."""
    return copy.deepcopy(metric).to("cpu") if callable(getattr(metric, "to", None)) else metric


def _cpu_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _cpu_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cpu_tensors(v) for v in value]
    return value


def note_failing_metric(exc: BaseException, name: str, outputs: Any, targets: Any) -> None:
    """Add to ``exc``, raised by the ``metrics=`` entry ``name`` on one batch, a note
    naming it and what it was given: a metric library's own words name neither."""
    exc.add_note(
        f"hooktrain: raised by metrics={{{name!r}: ...}} given outputs "
        f"{_described(outputs)} and targets {_described(targets)}"
    )


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"of shape {tuple(value.shape)} ({value.dtype})"
    return f"of type {type(value).__name__}"
