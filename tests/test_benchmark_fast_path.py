"""The loop's direct forward (only the core's forward_step, a plain module) trains
exactly as the forward_step hook does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class DeclinesForward:
    """Implements forward_step and returns None, so the core's default computes:
    the loop then goes through the hook instead of its direct path."""

    name = "declines_forward"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def forward_step(self, trainer, batch, batch_idx, stage):
        self.calls += 1


@pytest.mark.parametrize("metrics", [None, {"acc": accuracy}])
def test_direct_forward_matches_the_hook(metrics):
    results = []
    for plugins in ([], [DeclinesForward()]):
        train, val = make_data(shuffle=False)
        model = make_model()
        trainer = Trainer(plugins=plugins, max_epochs=2, device="cpu", seed=0)
        trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            metrics=metrics,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        results.append((model.state_dict(), trainer.metrics.floats()))
        if plugins:
            assert plugins[0].calls >= trainer.global_step  # the hook path was taken
    (direct_state, direct_metrics), (hook_state, hook_metrics) = results
    for key, value in direct_state.items():
        assert torch.equal(value, hook_state[key]), key
    assert direct_metrics == hook_metrics
    if metrics:
        assert "acc" in direct_metrics and "val_acc" in direct_metrics
