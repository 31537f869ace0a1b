"""A plugin class with options, state kept in checkpoints, selected as (class, options)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from hooktrain import Trainer, hookimpl
from hooktrain.errors import ConfigurationError
from hooktrain.testing import make_data, make_model


# --8<-- [start:plugin]
class GradNormMonitor:
    """Logs the gradient norm every ``every_n_steps`` optimizer steps."""

    name = "grad_norm_monitor"  # the name it is registered under

    def __init__(self, every_n_steps: int = 10) -> None:
        # Checked here, where the Trainer is built: a bad option found at the first
        # step would be found after the work before it.
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigurationError(
                f"grad_norm_monitor: every_n_steps must be an int >= 1, got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        # The running maximum stays on the device: float() every step would wait
        # for it each time.
        self._largest: torch.Tensor | None = None

    @property
    def largest(self) -> float:
        """The largest norm logged so far (read from the device when asked)."""
        return 0.0 if self._largest is None else float(self._largest)

    @hookimpl(tryfirst=True)
    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        # Called after gradients were unscaled and before clipping: true values. First,
        # so that another plugin changing gradients in this hook does not change them.
        if trainer.global_step % self.every_n_steps:
            return
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        # A tensor (no device sync here), of the optimizer step, not of a batch: every
        # step weighs the same in the epoch's mean. Its own name: the core logs
        # "grad_norm" when clipping.
        trainer.log("grad_norm_monitor/norm", norm, batch_size=1)
        self._largest = norm if self._largest is None else torch.maximum(self._largest, norm)

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"][trainer.plugin_manager.get_name(self)] = {"largest": self.largest}

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        state = checkpoint["plugins"].get(trainer.plugin_manager.get_name(self))
        if state is not None:
            self._largest = torch.tensor(state["largest"], device=trainer.device)


trainer = Trainer(plugins=[(GradNormMonitor, {"every_n_steps": 2})], max_epochs=2)
# --8<-- [end:plugin]

train_loader, val_loader = make_data()
trainer.fit(
    make_model(),
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
monitor = trainer.plugin_manager.get_plugin("grad_norm_monitor")
last = trainer.metrics["grad_norm_monitor/norm"]
print(f"largest gradient norm: {monitor.largest:.3f}; last logged: {last:.3f}")
assert monitor.largest > 0
assert trainer.dump_checkpoint()["plugins"]["grad_norm_monitor"]["largest"] == monitor.largest
