"""The loop's reductions over processes, seen from a plugin that makes a run
distributed: what it must implement, and that agreeing on names changes no value.

Real two-process runs (an uneven split, names that differ between processes, a stop
decided on one process) are in plugins/accelerate/tests/test_accelerate_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from hooktrain import PluginError, Trainer, hookimpl
from hooktrain.testing import run


class ReduceOnly:
    """A distributed plugin written before all_gather_object existed: it claims two
    processes and sums tensors (as two processes that saw the same data would)."""

    name = "reduce-only"

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.world_size = 2

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2


class ReduceAndGather(ReduceOnly):
    """The same, with the names of the two processes gathered too."""

    name = "reduce-and-gather"

    def __init__(self) -> None:
        self.gathered: list[object] = []

    @hookimpl
    def all_gather_object(self, obj: object) -> list[object]:
        self.gathered.append(obj)
        return [obj, obj]


def test_a_distributed_plugin_without_all_gather_object_is_told_to_implement_it() -> None:
    with pytest.raises(PluginError, match="world_size=2") as info:
        run([ReduceOnly()], max_epochs=1)
    assert "must implement the all_gather_object hook" in str(info.value)


def test_names_are_gathered_before_each_reduction_and_values_are_unchanged() -> None:
    alone = run([], max_epochs=2, seed=0).trainer.metrics.floats()
    plugin = ReduceAndGather()
    doubled = run([plugin], max_epochs=2, seed=0).trainer.metrics.floats()
    # Two identical processes: every mean is the one process's mean.
    assert doubled == pytest.approx(alone, rel=1e-6)
    # Per epoch, the training means and then the validation means, each once.
    assert plugin.gathered == [["acc", "loss"], ["val_acc", "val_loss"]] * 2
