"""The contracts of the hooks no other test exercised on their own: ``load_checkpoint``
(first result wins, ``None`` defers, an empty mapping starts fresh) and ``all_reduce``
(called only with several processes; its result is what every process uses)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from hooktrain import ConfigurationError, Trainer, hookimpl
from hooktrain.testing import run


class _SaveAtEpochEnd:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        torch.save(trainer.dump_checkpoint(), self.path)


class _NamedCheckpoints:
    """Resolves ``ckpt_path="best"`` itself and defers every other path to the core."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.asked: list[str] = []

    @hookimpl
    def load_checkpoint(self, ckpt_path: str) -> Mapping[str, Any] | None:
        self.asked.append(ckpt_path)
        if ckpt_path == "best":
            return torch.load(self.path, weights_only=True)
        return None


def test_load_checkpoint_first_result_wins_and_none_defers(tmp_path: Path) -> None:
    path = tmp_path / "one-epoch.pt"
    run([_SaveAtEpochEnd(path)], max_epochs=1)

    named = _NamedCheckpoints(path)
    resumed = run([named], max_epochs=2, fit_kwargs={"ckpt_path": "best"})
    assert named.asked == ["best"]
    assert resumed.recorder.count("on_train_epoch_start") == 1  # only epoch 1 remains
    loads = resumed.recorder.of("on_load_checkpoint")
    assert len(loads) == 1 and loads[0].kwargs["checkpoint"]["progress"]["epoch"] == 0

    named = _NamedCheckpoints(path)
    deferred = run([named], max_epochs=2, fit_kwargs={"ckpt_path": str(path)})
    assert named.asked == [str(path)]  # asked, returned None: the core read the file
    assert deferred.recorder.count("on_train_epoch_start") == 1

    with pytest.raises(ConfigurationError, match="does not exist"):
        run([_NamedCheckpoints(path)], fit_kwargs={"ckpt_path": str(tmp_path / "nope.pt")})


def test_load_checkpoint_returning_an_empty_mapping_starts_fresh() -> None:
    class NothingToResume:
        @hookimpl
        def load_checkpoint(self, ckpt_path: str) -> Mapping[str, Any]:
            return {}

    result = run([NothingToResume()], max_epochs=2, fit_kwargs={"ckpt_path": "last"})
    assert result.recorder.count("on_load_checkpoint") == 0
    assert result.recorder.count("on_train_epoch_start") == 2


class _TwoProcesses:
    """Claims two processes; its ``all_reduce`` doubles what it receives, as a sum
    over two identical processes would."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.stop_at_step = stop_at_step
        self.reduced: list[torch.Tensor] = []

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.world_size = 2

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.stop_at_step:
            trainer.should_stop = True

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reduced.append(tensor.clone())
        return tensor * 2

    @hookimpl
    def all_gather_object(self, obj: object) -> list[object]:
        return [obj, obj]


def test_all_reduce_is_not_called_with_one_process() -> None:
    result = run(max_epochs=1)
    assert result.recorder.count("all_reduce") == 0


def test_all_reduce_sums_epoch_metrics_and_agrees_on_stopping() -> None:
    reference = run(max_epochs=1, seed=0, limit_train_batches=3)
    plugin = _TwoProcesses()
    result = run([plugin], max_epochs=1, seed=0, limit_train_batches=3)
    # Once per batch for the stop flag, then for the epoch's and validation's sums.
    assert result.recorder.count("all_reduce") > 3
    flags = [t for t in plugin.reduced if t.numel() == 1 and t.item() in (0.0, 1.0)]
    assert len(flags) >= 3
    # Sums and counts both doubled: the means equal those of a single process.
    assert result.trainer.metrics["loss"] == pytest.approx(reference.trainer.metrics["loss"])
    assert result.trainer.metrics["val_loss"] == pytest.approx(
        reference.trainer.metrics["val_loss"]
    )


def test_a_stop_on_one_process_stops_all_at_the_same_batch() -> None:
    plugin = _TwoProcesses(stop_at_step=2)
    result = run([plugin], max_epochs=3)
    assert result.trainer.global_step == 2
    assert result.recorder.count("on_train_batch_end") == 2
