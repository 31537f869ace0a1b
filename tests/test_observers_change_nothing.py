"""Plugins that only observe change nothing: a plugin that declines
``forward_step``, one with a per-step hook that does nothing, and one that watches
every batch's end train exactly the weights, and publish exactly the values, of the
bare core. The hooks they implement are resolved to callers of their own (a direct
caller, pluggy's caller), so this also holds those callers to the core's defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooktrain import Trainer, accuracy, hookimpl
from hooktrain.testing import make_data, make_model


class DeclinesForward:
    """Implements forward_step and returns None, so the core's default computes,
    called through a direct caller instead of directly."""

    name = "declines_forward"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def forward_step(self, trainer, batch, batch_idx, stage):
        self.calls += 1


@pytest.mark.parametrize("metrics", [None, {"acc": accuracy}])
def test_a_declining_forward_step_changes_nothing(metrics):
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


class Publications:
    name = "publications"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict]] = []

    @hookimpl
    def log_metrics(self, metrics, step, scope):
        self.seen.append((step, scope, dict(metrics)))


class TouchesEveryBatch:
    """A hook inside the step that does nothing."""

    name = "touches"

    @hookimpl
    def on_before_backward(self, trainer):
        pass


class WatchesBatchEnds:
    """Records what ``on_train_batch_end`` shows, to compare two runs' views."""

    name = "watches"

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    @hookimpl
    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.seen.append(
            (
                batch_idx,
                trainer.global_step,
                trainer.epoch_batches_done,
                trainer.sync_gradients,
                trainer.last_step_skipped,
                sorted(outputs),
                outputs["loss"].item(),
                outputs["outputs"].detach().clone(),
                outputs["targets"].clone(),
                batch[0].clone(),
                trainer.metrics["loss"],
            )
        )


def _same_views(a: list[tuple], b: list[tuple]) -> bool:
    if len(a) != len(b):
        return False
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if isinstance(x, torch.Tensor):
                if not torch.equal(x, y):
                    return False
            elif x != y:
                return False
    return True


@pytest.mark.parametrize("watched", [True, False])
@pytest.mark.parametrize("max_steps", [11, None])
def test_a_hook_inside_the_step_changes_nothing(max_steps, watched):
    outcomes = []
    watchers = []
    for extra in ([], [TouchesEveryBatch()]):
        publications = Publications()
        watcher = WatchesBatchEnds()
        watchers.append(watcher)
        extra = [*extra, watcher] if watched else extra
        train, val = make_data()
        model = make_model(dropout=0.2)
        trainer = Trainer(
            plugins=[publications, *extra],
            max_epochs=3,
            max_steps=max_steps,
            log_every_n_steps=3,
            device="cpu",
            seed=4,
        )
        trainer.fit(
            model,
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        outcomes.append(
            (
                model.state_dict(),
                publications.seen,
                trainer.global_step,
                trainer.epoch_batches_done,
                trainer.current_epoch,
            )
        )
    (state_a, seen_a, *progress_a), (state_b, seen_b, *progress_b) = outcomes
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key
    assert seen_a == seen_b and len(seen_a) > 3
    assert progress_a == progress_b
    if watched:
        bare, touched = watchers
        assert len(bare.seen) == progress_a[0]
        assert _same_views(bare.seen, touched.seen)
