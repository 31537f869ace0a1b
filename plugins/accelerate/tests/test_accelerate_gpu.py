"""hooktrain-accelerate on one CUDA GPU: fp16 through accelerate's own scaler.
Skipped where there is no GPU; never required."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class InfAtBatchOne:
    name = "inf-at-batch-one"

    def __init__(self) -> None:
        self.batch_idx = -1
        self.skipped: list[bool] = []
        self.dtypes: set[torch.dtype] = set()

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.module[0].register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))

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


def test_fp16_on_cuda_runs_in_half_and_reports_a_skipped_step() -> None:
    watch = InfAtBatchOne()
    trainer = Trainer(
        plugins=[("accelerate", {"mixed_precision": "fp16"}), watch],
        seed=0,
        max_epochs=1,
        gradient_clip_val=1.0,
    )
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(
        make_model(),
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert trainer.device.type == "cuda"
    assert watch.dtypes == {torch.float16}
    assert watch.skipped == [False, True, False, False]
