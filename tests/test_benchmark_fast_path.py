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


class Publications:
    name = "publications"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict]] = []

    @hookimpl
    def log_metrics(self, metrics, step, scope):
        self.seen.append((step, scope, dict(metrics)))


class TouchesEveryBatch:
    """A hook inside the step: its presence sends the loop down the general path."""

    name = "touches"

    @hookimpl
    def on_before_backward(self, trainer):
        pass


class WatchesBatchEnds:
    """``on_train_batch_end`` alone keeps the lean loop; it must see what the general
    loop would show it."""

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
def test_loop_without_per_step_plugins_matches_the_general_loop(max_steps, watched):
    # Unwatched, the lean loop hands each log interval's losses over at its end;
    # watched, at every step. Both must publish what the general loop publishes.
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
        lean, general = watchers
        assert len(lean.seen) == progress_a[0]
        assert _same_views(lean.seen, general.seen)


def test_only_a_batch_end_watcher_keeps_the_lean_loop(monkeypatch):
    taken = []
    original = Trainer._train_batches_alone

    def spy(self, *args):
        taken.append(self.current_epoch)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_batches_alone", spy)
    for plugins, lean in (([WatchesBatchEnds()], True), ([TouchesEveryBatch()], False)):
        taken.clear()
        train, _ = make_data()
        Trainer(plugins=plugins, max_epochs=2, device="cpu").fit(
            make_model(),
            train,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        assert taken == ([0, 1] if lean else [])
