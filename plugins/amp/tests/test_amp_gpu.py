"""hooktrain-amp on a CUDA GPU. Skipped where there is none; never required."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Watch:
    """Records the hidden dtype, puts an inf gradient into batch 1, and records
    whether each step was skipped."""

    name = "watch"

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.skipped: list[bool] = []
        self.batch_idx = -1

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        first = trainer.module[0]
        first.register_forward_hook(lambda module, args, out: self.dtypes.add(out.dtype))

    @hookimpl
    def on_train_batch_start(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    @hookimpl
    def on_after_backward(self, trainer: Trainer) -> None:
        if self.batch_idx == 1:
            next(trainer.module.parameters()).grad[0, 0] = math.inf

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        self.skipped.append(trainer.last_step_skipped)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_and_scaler_on_cuda(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    watch = Watch()
    trainer = Trainer(
        plugins=[("amp", {"precision": precision, "scaler": True}), watch],
        device="cuda",
        seed=0,
        max_epochs=1,
    )
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    expected = torch.float16 if precision == "fp16" else torch.bfloat16
    assert watch.dtypes == {expected}
    assert watch.skipped == [False, True, False, False]
