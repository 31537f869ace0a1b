"""Mixed precision for hooktrain, through hooks only.

Select it with ``Trainer(plugins=[("amp", {"precision": "bf16"})])``. The forward
step (model and loss) of every stage, and the evaluation loss and metrics the core
computes after it (``compute_metrics``), run under :func:`torch.autocast` on the
trainer's device type. With ``precision="fp16"`` a :class:`torch.amp.GradScaler`
scales the loss before ``backward``, unscales the gradients once per optimizer
step (before ``on_before_optimizer_step`` and clipping, so both see true values),
steps through the scaler, which skips a step whose gradients hold inf/NaN, and
updates the scale once per step. A skipped step is reported to the core
(``optimizer_step`` returns ``False``), which then leaves the LR schedulers alone
and sets ``trainer.last_step_skipped``.

The scaler's state is saved under ``checkpoint["plugins"][<registered name>]``.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

    from hooktrain import Trainer

__all__ = ["MixedPrecision"]
__version__ = "0.1.0"

_PRECISIONS = {
    "bf16": "bfloat16",
    "bf16-mixed": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "16-mixed": "float16",
    "float16": "float16",
}


class MixedPrecision:
    """Runs the forward step under ``torch.autocast``; for fp16 also scales the loss.

    :param precision: ``"bf16"`` or ``"fp16"`` (also ``"bf16-mixed"``,
        ``"16-mixed"``, ``"bfloat16"``, ``"float16"``).
    :param scaler: use a gradient scaler. ``None`` (default) uses one for fp16
        only; ``True`` forces one for bf16 too (harmless, rarely useful);
        ``False`` runs fp16 without one (gradients may underflow).
    :param init_scale: the scaler's first loss scale.
    :param growth_interval: steps without inf/NaN before the scaler doubles the
        scale.
    """

    name = "amp"
    # The forward must never run under two autocasts, nor the loss under two
    # scalers: a second plugin deciding precision (accelerate) is refused when the
    # Trainer is built.
    exclusive_roles = ("precision",)

    def __init__(
        self,
        precision: str = "bf16",
        scaler: bool | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ConfigurationError(
                f"amp: precision must be one of {', '.join(sorted(_PRECISIONS))}, got {precision!r}"
            )
        if scaler not in (None, True, False):
            raise ConfigurationError(f"amp: scaler must be True, False or None, got {scaler!r}")
        self.precision = precision
        self._dtype_name = _PRECISIONS[precision]
        self._use_scaler = scaler if scaler is not None else self._dtype_name == "float16"
        self.init_scale = float(init_scale)
        self.growth_interval = int(growth_interval)
        #: The device type autocast runs on (``"cpu"``, ``"cuda"``), known after ``prepare``.
        self.device_type: str | None = None
        #: The gradient scaler of the current fit, or ``None`` without one.
        self.scaler: torch.amp.GradScaler | None = None
        self._dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        return f"MixedPrecision(precision={self.precision!r}, scaler={self._use_scaler})"

    # ------------------------------------------------------------------ setup

    @hookimpl
    def prepare(self, trainer: Trainer, stage: str) -> None:
        # Done here rather than in setup: a plugin listed after this one may still
        # change trainer.device in its own setup.
        import torch

        device = torch.device(trainer.device)
        self.device_type = device.type
        self._dtype = getattr(torch, self._dtype_name)
        self._check_autocast(device)
        if stage == "fit":
            self.scaler = self._make_scaler(device) if self._use_scaler else None

    def _check_autocast(self, device: torch.device) -> None:
        """Refuse a precision the device cannot run, instead of silently training in
        float32 (autocast ignores dtypes it does not support on a device)."""
        import torch

        name = self.precision
        if not torch.amp.is_autocast_available(device.type):
            raise ConfigurationError(
                f"amp: torch.autocast does not support device type {device.type!r}; "
                f"precision={name!r} cannot run on {device}"
            )
        if device.type == "cuda" and self._dtype is torch.bfloat16 and not _cuda_has_native_bf16():
            raise ConfigurationError(
                f"amp: {torch.cuda.get_device_name(device)} has no native bfloat16; "
                f"use precision='fp16'"
            )
        # A tiny matmul tells whether autocast really computes in the dtype here.
        try:
            probe = torch.ones(2, 2, device=device)
            with torch.autocast(device.type, dtype=self._dtype):
                result = torch.nn.functional.linear(probe, probe)
        except Exception as exc:
            raise ConfigurationError(
                f"amp: precision={name!r} ({self._dtype}) does not run under torch.autocast on "
                f"{device}: {type(exc).__name__}: {exc}. Use precision='bf16' or another device."
            ) from exc
        if result.dtype != self._dtype:
            raise ConfigurationError(
                f"amp: torch.autocast on {device} computes a linear layer in {result.dtype}, not "
                f"{self._dtype}: precision={name!r} is not supported there; use another "
                f"precision or device"
            )

    def _make_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        import torch

        try:
            scaler = torch.amp.GradScaler(
                device.type, init_scale=self.init_scale, growth_interval=self.growth_interval
            )
        except Exception as exc:
            raise ConfigurationError(
                f"amp: this torch ({torch.__version__}) has no gradient scaler for device type "
                f"{device.type!r}: {exc}"
            ) from exc
        if not scaler.is_enabled():
            # GradScaler disables itself (with a warning) where it cannot work;
            # training fp16 without it would underflow silently.
            raise ConfigurationError(
                f"amp: torch.amp.GradScaler({device.type!r}) is disabled on this machine; "
                f"fp16 needs it. Use precision='bf16' or pass scaler=False knowingly."
            )
        return scaler

    # ------------------------------------------------------------------ compute

    @hookimpl(wrapper=True)
    def forward_step(self) -> Generator[None, Any, Any]:
        import torch

        with torch.autocast(self.device_type, dtype=self._dtype):
            return (yield)

    @hookimpl(wrapper=True)
    def compute_metrics(self) -> Generator[None, Any, Any]:
        # The evaluation loss and the metrics are computed from the outputs outside
        # forward_step; under the same autocast, a bf16 logit's cross-entropy is
        # computed in float32 as the training loss is.
        import torch

        with torch.autocast(self.device_type, dtype=self._dtype):
            return (yield)

    @hookimpl
    def backward(self, loss: torch.Tensor) -> bool | None:
        if self.scaler is None:
            return None
        self.scaler.scale(loss).backward()
        return True

    @hookimpl
    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # Called once per optimizer step (after the whole accumulation window), so
        # the scaler's "unscale once per update" rule holds.
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    @hookimpl
    def optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> bool | None:
        scaler = self.scaler
        if scaler is None:
            return None
        scaler.step(optimizer)
        skipped = _found_inf(scaler, optimizer)
        # One update per optimizer step of the trainer, after every optimizer has
        # stepped: update() forgets the per-optimizer inf checks.
        if optimizer is trainer.optimizers[-1]:
            scaler.update()
        return not skipped

    # ------------------------------------------------------------------ checkpoints

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"precision": self.precision}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        checkpoint["plugins"][trainer.plugin_manager.get_name(self)] = state

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        state = checkpoint.get("plugins", {}).get(trainer.plugin_manager.get_name(self))
        if not state:
            return
        saved = state.get("scaler")
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)
        elif saved and self.scaler is None:
            print(
                f"hooktrain-amp: the checkpoint holds a gradient scaler state "
                f"(precision={state.get('precision')!r}); this run uses none, so it is ignored",
                file=sys.stderr,
            )


def _cuda_has_native_bf16() -> bool:
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no including_emulation and no emulation
        return torch.cuda.is_bf16_supported()


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the scaler skipped ``optimizer``'s step for inf/NaN gradients.

    Read between ``step`` and ``update``; ``step`` has already synchronised with
    the device to decide, so reading it again costs nothing more.
    """
    per_device = scaler._found_inf_per_device(optimizer)
    return bool(sum(float(v.item()) for v in per_device.values()))
