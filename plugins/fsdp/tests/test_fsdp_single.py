"""The fsdp plugin in this process: a process group of one, real ``fully_shard``.

The process group the plugin creates outlives each fit (as it must for a script to
gather weights afterwards), so every test here shares one.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import ConfigurationError, HookError, Trainer
from hooktrain.batches import fingerprint
from hooktrain.testing import make_data, make_model

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def fit(plugins: list[Any], model: nn.Module, optimizer: Any = adam, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 2)
    trainer = Trainer(plugins=plugins, seed=0, device="cpu", **kwargs)
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(model, train, val, loss_fn=F.cross_entropy, optimizer=optimizer)
    return trainer


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()
    }


def test_one_process_shards_the_model_and_trains_like_the_core() -> None:
    model = make_model()
    unsharded = [weakref.ref(p) for p in model.parameters()]
    trainer = fit(["fsdp"], model, gradient_clip_val=0.5)
    gc.collect()
    # Nothing keeps the full tensors from before sharding: only the shards remain.
    assert all(ref() is None for ref in unsharded)
    reference = make_model()
    fit([], reference, gradient_clip_val=0.5)
    assert trainer.world_size == 1
    # Every direct child holding parameters, and the root, are sharded units.
    assert isinstance(model, FSDPModule)
    assert isinstance(model[0], FSDPModule) and isinstance(model[2], FSDPModule)
    assert not isinstance(model[1], FSDPModule)  # ReLU holds no parameters
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(full(model)[name], value, rtol=0, atol=1e-6, msg=name)
    # The clipped norm was logged as a plain number.
    assert "grad_norm" in trainer.metrics.floats()


def test_a_ready_made_optimizer_is_rebound_to_the_sharded_parameters() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    fit(["fsdp"], model, optimizer=optimizer)
    sharded = list(model.parameters())
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(sharded) and all(a is b for a, b in zip(held, sharded, strict=True))
    reference = make_model()
    fit([], reference)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(full(model)[name], value, rtol=0, atol=1e-6, msg=name)


def test_an_optimizer_that_already_stepped_is_refused_before_training() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HookError, match="pass optimizer= a callable") as info:
        fit(["fsdp"], model, optimizer=optimizer)
    assert isinstance(info.value.__cause__, ConfigurationError)
    assert info.value.hook == "prepare" and info.value.plugin == "fsdp"
    for name, value in full(model).items():  # nothing trained
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.inner(x))


def test_auto_wrap_policy_by_class_and_name_and_mixed_precision_policy() -> None:
    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    policy = {"param_dtype": "bfloat16", "reduce_dtype": torch.float32}
    fit([("fsdp", {"auto_wrap_policy": ["Block"], "mp_policy": policy})], model, max_epochs=1)
    assert [isinstance(m, FSDPModule) for m in model] == [True, True, False]
    assert not isinstance(model[0].inner, FSDPModule)
    assert model[0].inner.weight.dtype == torch.float32  # sharded parameters stay fp32

    by_class = nn.Sequential(Block(), nn.Linear(8, 2))
    fit([("fsdp", {"auto_wrap_policy": {nn.Linear}})], by_class, max_epochs=1)
    assert isinstance(by_class[0].inner, FSDPModule) and isinstance(by_class[1], FSDPModule)
    assert not isinstance(by_class[0], FSDPModule)


def test_an_auto_wrap_policy_matching_no_submodule_is_refused_before_training() -> None:
    model = nn.Sequential(Block(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(HookError, match=r"\['Linearr'\] match no submodule.*Block, Linear") as info:
        fit([("fsdp", {"auto_wrap_policy": ["Linearr", nn.Linear]})], model, max_epochs=1)
    assert isinstance(info.value.__cause__, ConfigurationError)
    assert not isinstance(model, FSDPModule)  # nothing was sharded
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_options_are_refused_when_the_plugin_is_built() -> None:
    from hooktrain_fsdp import FSDP

    with pytest.raises(ConfigurationError, match="no field param_type"):
        FSDP(mp_policy={"param_type": "bfloat16"})
    with pytest.raises(ConfigurationError, match="'bfloat17' is not a torch dtype"):
        FSDP(mp_policy={"param_dtype": "bfloat17"})
    with pytest.raises(ConfigurationError, match="auto_wrap_policy must hold"):
        FSDP(auto_wrap_policy=[3])
    for timeout in (0, -5, "30", True):
        with pytest.raises(
            ConfigurationError, match=f"timeout must be seconds > 0, got {timeout!r}"
        ):
            FSDP(timeout=timeout)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    assert FSDP(mp_policy=policy).mp_policy is policy


class OwnSteps(nn.Module):
    """Its own steps call a submodule directly, and the root holds a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.scale = nn.Parameter(torch.ones(2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x) * self.scale, y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x) * self.scale, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_a_model_with_its_own_steps_and_configure_optimizers() -> None:
    model, reference = OwnSteps(), OwnSteps()
    trainer = Trainer(plugins=["fsdp"], seed=0, device="cpu", max_epochs=2)
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(model, train, val)
    Trainer(plugins=[], seed=0, device="cpu", max_epochs=2).fit(reference, train, val)
    assert isinstance(model.scale, DTensor)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(full(model)[name], value, rtol=0, atol=1e-6, msg=name)
    # Evaluation after fit runs on the sharded model too.
    metrics = trainer.validate(model, val)
    assert metrics["val_loss"] == pytest.approx(trainer.metrics["val_loss"], abs=1e-6)


def test_fsdp_and_accelerate_together_are_refused_naming_both_and_the_role() -> None:
    pytest.importorskip("hooktrain_accelerate")
    with pytest.raises(ConfigurationError) as info:
        Trainer(plugins=["fsdp", "accelerate"])
    message = str(info.value)
    assert "fsdp" in message and "accelerate" in message and "distributed" in message


class TwoProcesses:
    """What ``shard_loader`` reads of a trainer of rank 1 among 2 processes."""

    world_size, global_rank, data_seed = 2, 1, 0


def same_everywhere(mine: Any) -> list[Any]:
    """``gather`` as two processes holding the same thing answer it."""
    return [mine, mine]


def test_a_training_set_split_by_hand_is_refused_not_split_again() -> None:
    # A Subset per rank was split a second time: each process trained half its share.
    from hooktrain_fsdp.data import shard_loader
    from torch.utils.data import DataLoader, Subset, TensorDataset

    data = TensorDataset(torch.arange(32.0))
    mine = DataLoader(Subset(data, range(16, 32)), batch_size=4, shuffle=True)
    theirs = (16, fingerprint(data[0]))
    expected = r"different dataset on each process \(samples: 16 on process 0, 16 on process 1"
    with pytest.raises(ConfigurationError, match=expected):
        shard_loader(TwoProcesses(), mine, lambda own: [theirs, own])


def test_a_sampler_that_picks_samples_is_refused_and_a_distributed_one_kept() -> None:
    # Every sampler was replaced by a DistributedSampler over the whole dataset: a
    # SubsetRandomSampler's held-out samples were trained on, and no epoch shuffled.
    from hooktrain_fsdp.data import shard_loader
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        RandomSampler,
        SubsetRandomSampler,
        TensorDataset,
        WeightedRandomSampler,
    )

    data = TensorDataset(torch.arange(32.0))
    for sampler in (
        SubsetRandomSampler(list(range(0, 32, 2))),
        WeightedRandomSampler([1.0] * 32, num_samples=32),
        RandomSampler(data, replacement=True),
    ):
        loader = DataLoader(data, batch_size=4, sampler=sampler)
        with pytest.raises(ConfigurationError, match=type(sampler).__name__):
            shard_loader(TwoProcesses(), loader, same_everywhere)
    own = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 2, 1, seed=3))
    assert shard_loader(TwoProcesses(), own, same_everywhere) is own
    # One that splits for another process count would train rank 1 on everything.
    alone = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 1, 0))
    with pytest.raises(ConfigurationError, match="process 0 of 1, but this is process 1 of 2"):
        shard_loader(TwoProcesses(), alone, same_everywhere)
    for shuffle in (True, False):
        split = shard_loader(
            TwoProcesses(), DataLoader(data, batch_size=4, shuffle=shuffle), same_everywhere
        )
        assert isinstance(split.sampler, DistributedSampler) and split.sampler.rank == 1
        assert split.sampler.shuffle is shuffle and len(split.sampler) == 16


def test_a_batchs_fingerprint_tells_apart_what_processes_must_not_mistake() -> None:
    # Processes take equal fingerprints for the whole evaluation set on each. NaN
    # was read as 0 and a NumPy array by its type alone, so shares split by hand
    # that differed only there were taken for the whole set.
    import numpy as np

    from hooktrain.batches import fingerprint

    x = torch.arange(12.0).reshape(4, 3)
    batch = {"x": x, "y": torch.tensor([0, 1, 0, 1]), "ids": ["a", "b", "c", "d"]}
    assert fingerprint(batch) == fingerprint({k: v for k, v in batch.items()})
    with_nan, with_zero = x.clone(), x.clone()
    with_nan[1, 1], with_zero[1, 1] = float("nan"), 0.0
    others = (
        {**batch, "x": x.flip(0)},  # the same rows, in another order
        {**batch, "x": x.to(torch.float16)},
        {**batch, "x": x.reshape(3, 4)},
        {**batch, "ids": ["a", "b", "c", "e"]},
        {**batch, "x": with_nan},
        {**batch, "x": with_zero},
        {**batch, "x": x.numpy() + 1},
    )
    prints = [fingerprint(batch)] + [fingerprint(other) for other in others]
    assert all(a != b for i, a in enumerate(prints) for b in prints[i + 1 :])
    assert fingerprint(x.numpy()) == fingerprint(x) != fingerprint(np.zeros((4, 3)))
    assert fingerprint(with_nan) == fingerprint(with_nan.clone())


def test_a_distributed_sampler_is_found_as_the_sampler_or_the_batch_samplers() -> None:
    # Either way the loader holds one process's share, never the whole set.
    from hooktrain_fsdp.data import has_distributed_sampler
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

    data = TensorDataset(torch.arange(16.0))
    by_sampler = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 2, 0))
    batches = BatchSampler(DistributedSampler(data, 2, 0), batch_size=4, drop_last=False)
    assert has_distributed_sampler(by_sampler)
    assert has_distributed_sampler(DataLoader(data, batch_sampler=batches))
    assert not has_distributed_sampler(DataLoader(data, batch_size=4, shuffle=True))
    assert not has_distributed_sampler([(torch.zeros(4),)])
