"""Metrics and RunningMeans: the loop's stored values, device-side means and
finiteness check."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hooktrain.metrics import Metrics
from hooktrain.running_means import RunningMeans


@pytest.mark.parametrize("sizes", [[32, 32, 32], [32, 10, 5], [1, 1, 1]])
def test_weighted_means_whatever_the_batch_sizes(sizes: list[int]) -> None:
    means = RunningMeans()
    values = [0.5, 2.0, -1.25]
    for value, size in zip(values, sizes, strict=True):
        means.add("loss", torch.tensor(value), size)
    expected = sum(v * s for v, s in zip(values, sizes, strict=True)) / sum(sizes)
    assert float(means.compute()["loss"]) == pytest.approx(expected, rel=1e-6)


def test_means_of_half_precision_values_are_summed_in_float32() -> None:
    means = RunningMeans()
    for _ in range(4097):  # 4097 has no float16 representation: it would round to 4096
        means.add("loss", torch.tensor(1.0, dtype=torch.float16), 1)
    mean = means.compute()["loss"]
    assert mean.dtype == torch.float32 and float(mean) == 1.0


@pytest.mark.parametrize("sizes", [[3, 3, 3], [3, 5, 7]])
def test_means_of_float64_values_keep_float64(sizes: list[int]) -> None:
    # A float64 model's loss: a float32 sum was off by about 1e-7 from the mean.
    values = [1 / 3, 2 / 7, 1e-9 + 0.1]
    means = RunningMeans()
    for value, size in zip(values, sizes, strict=True):
        means.add("loss", torch.tensor(value, dtype=torch.float64), size)
    mean = means.compute()["loss"]
    expected = sum(v * s for v, s in zip(values, sizes, strict=True)) / sum(sizes)
    assert mean.dtype == torch.float64
    assert float(mean) == pytest.approx(expected, rel=1e-15)


def test_fold_finite_reports_each_new_stretch_once() -> None:
    means = RunningMeans()
    assert means.fold_finite("loss") is None  # nothing folded yet
    means.add("loss", torch.tensor(1.0), 4)
    assert bool(means.fold_finite("loss")) is True
    assert means.fold_finite("loss") is None  # nothing new since
    means.add("loss", torch.tensor(math.nan), 4)
    means.add("loss", torch.tensor(2.0), 4)
    assert bool(means.fold_finite("loss")) is False
    means.reset()
    means.add("loss", torch.tensor(3.0), 4)
    assert bool(means.fold_finite("loss")) is True


def test_infinity_between_checks_is_seen_even_after_an_automatic_fold() -> None:
    means = RunningMeans()
    means.add("loss", torch.tensor(math.inf), 1)
    for _ in range(RunningMeans.fold_every):  # forces a fold inside add
        means.add("loss", torch.tensor(1.0), 1)
    assert bool(means.fold_finite("loss")) is False


def test_floats_keep_the_conversion_and_snapshot_floats_leave_the_store_alone() -> None:
    metrics = Metrics()
    metrics.set("loss", torch.tensor(0.5))
    metrics.set("acc", torch.tensor(0.25))
    metrics.set("lr", 0.1)
    assert metrics.snapshot_floats() == {"loss": 0.5, "acc": 0.25, "lr": 0.1}
    assert isinstance(metrics.raw("loss"), torch.Tensor)  # a reader elsewhere stores nothing
    assert metrics.floats(["acc", "missing"]) == {"acc": 0.25}
    assert metrics.raw("acc") == 0.25 and isinstance(metrics.raw("loss"), torch.Tensor)
    assert metrics.floats() == {"loss": 0.5, "acc": 0.25, "lr": 0.1}
    assert metrics.raw("loss") == 0.5


def test_floats_read_each_value_in_its_own_precision() -> None:
    # Several tensors were stacked as float32 to be read at once: with a logger
    # installed a float64 model's metrics were rounded, and a large count too.
    exact = 1.1329923143258347
    metrics = Metrics()
    metrics.set("val_loss", torch.tensor(exact, dtype=torch.float64))
    metrics.set("val_acc", torch.tensor(0.75, dtype=torch.float64))
    metrics.set("samples", torch.tensor(16_777_217))  # 2**24 + 1: not a float32
    metrics.set("count", torch.tensor(3))
    metrics.set("loss", torch.tensor(0.1))  # float32: as item() reads it
    assert metrics.floats() == {
        "val_loss": exact,
        "val_acc": 0.75,
        "samples": 16_777_217.0,
        "count": 3.0,
        "loss": torch.tensor(0.1).item(),
    }


def _filled(values: list, sizes: list[int]) -> RunningMeans:
    means = RunningMeans()
    means.fold_every = 4  # some values folded, the rest still pending
    for value, size in zip(values, sizes, strict=True):
        means.add("loss", value, size)
    return means


def test_a_saved_state_keeps_pending_values_unfolded_and_resumes_to_the_same_bits() -> None:
    generator = torch.Generator().manual_seed(0)
    values = list(torch.rand(11, generator=generator) * 3)
    sizes = [7] * 10 + [1]
    whole = _filled(values, sizes)
    cut = _filled(values[:6], sizes[:6])  # 4 folded, 2 pending
    state = cut.state_dict()
    loaded = torch.load(_saved(state), weights_only=True)
    assert loaded["pending"]["loss"][0].shape == (2,)
    resumed = RunningMeans()
    resumed.fold_every = 4
    resumed.load_state_dict(loaded, torch.device("cpu"))
    for value, size in zip(values[6:], sizes[6:], strict=True):
        resumed.add("loss", value, size)
    assert torch.equal(resumed.compute()["loss"], whole.compute()["loss"])


def test_a_saved_state_goes_to_rank_zero_alone() -> None:
    # Saved by one process, resumed by two: rank 1 adding it too would count the
    # epoch's first part twice in the reduction at its end.
    state = _filled([torch.tensor(1.0)] * 6, [2] * 6).state_dict()
    other = RunningMeans()
    other.load_state_dict(state, torch.device("cpu"), rank=1)
    assert other.compute() == {}
    first = RunningMeans()
    first.load_state_dict(state, torch.device("cpu"), rank=0)
    assert float(first.compute()["loss"]) == 1.0


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_pending_numbers_save_as_floats_and_sums_of_numbers_keep_float64() -> None:
    import numpy as np

    values = [np.float64(1 / 3), 2 / 3, 1, np.float64(0.1)] * 3  # what trainer.log takes
    whole = _filled(values, [1] * 12)
    cut = _filled(values[:10], [1] * 10)  # 8 folded into a float sum, 2 pending
    loaded = torch.load(_saved(cut.state_dict()), weights_only=True)
    assert loaded["sums"]["loss"].dtype == torch.float64
    resumed = RunningMeans()
    resumed.fold_every = 4
    resumed.load_state_dict(loaded, torch.device("cpu"))
    for value in values[10:]:
        resumed.add("loss", value, 1)
    assert float(resumed.compute()["loss"]) == whole.compute()["loss"]


def test_pending_values_on_two_devices_fold_onto_the_latest_ones() -> None:
    # Restored onto the training device, then a metric computed on another device
    # adds to the same name (or the other way round): the fold puts them on one.
    # "meta" stands in for a GPU: a tensor can be copied onto it, not out of it.
    state = _filled([torch.tensor(1.0)] * 6, [2] * 6).state_dict()
    resumed = RunningMeans()
    resumed.fold_every = 4
    resumed.load_state_dict(state, torch.device("cpu"))
    resumed.add("loss", torch.tensor(3.0, device="meta"), 2)
    assert resumed.compute()["loss"].device.type == "meta"
