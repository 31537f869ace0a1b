"""The accelerate plugin's processes: the Accelerator that sees them all, and a
process group ended together when the script exits."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["LAUNCH_HINT", "create_accelerator", "destroy_process_group_at_exit", "has_gpu"]

LAUNCH_HINT = (
    "launch with 'torchrun --standalone --nproc_per_node N script.py' or "
    "'accelerate launch --multi_gpu --num_processes N script.py'"
)

_exit_cleanup_registered = False


def destroy_process_group_at_exit() -> None:
    """Wait for every process, then destroy the process group, when the interpreter
    exits.

    A gloo process whose peer exits while its own background work is still in
    flight aborts ("terminate called without an active exception", exit code -6):
    that happened in about a third of finished two-process runs here, turning a
    finished training into a failed job. A barrier first lets every process reach
    the end; destroying the group alone was not enough. The group must outlive every
    fit of the script, so this runs at exit, not in ``teardown``.
    """
    global _exit_cleanup_registered
    if _exit_cleanup_registered:
        return
    _exit_cleanup_registered = True

    def destroy() -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        try:
            # A process dying of an uncaught exception (sys.last_value is set then)
            # does not wait: a peer blocked in a collective it will never join keeps
            # even this barrier from returning on gloo, timeout or not, and the
            # launcher ends the job only once this process has exited.
            if getattr(sys, "last_value", None) is None and dist.get_backend() == "gloo":
                # Bounded: a peer that crashed must not keep this process forever.
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception as exc:  # a peer died; exit anyway, saying why
            print(f"hooktrain-accelerate: processes did not meet at exit: {exc}", file=sys.stderr)
        dist.destroy_process_group()

    atexit.register(destroy)


def has_gpu() -> bool:
    """Whether torch sees an accelerator device (CUDA, or another through
    ``torch.accelerator``)."""
    import torch

    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None and hasattr(accelerator_api, "is_available"):
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def fp16_refused(device: Any) -> ConfigurationError:
    """The error for fp16 asked for on ``device``, where accelerate trains in float32."""
    return ConfigurationError(
        f"accelerate: mixed_precision='fp16' does not run on {device} (accelerate would "
        f"silently train in float32 there); use 'bf16', or the 'amp' plugin without "
        f"'accelerate' for fp16 on the CPU"
    )


def create_accelerator(
    *,
    cpu: bool | None,
    mixed_precision: str | None,
    split_batches: bool,
    find_unused_parameters: bool,
    accelerator_kwargs: Mapping[str, Any],
) -> Accelerator:
    """The run's ``Accelerator``, with as many processes as were launched.

    ``cpu=None`` picks the CPU when several processes were launched on a machine
    without a GPU, where a plain Accelerator would run them as independent copies.
    Accumulation, scheduler stepping and the data's
    shuffling are set so that the core stays in charge of them.

    :raises ConfigurationError: when the Accelerator sees another number of
        processes than ``WORLD_SIZE`` says were launched, or fp16 was asked for
        where it would silently train in float32.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        GradientAccumulationPlugin,
    )

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if cpu is None:
        # Under torchrun on a machine without a GPU, a plain Accelerator()
        # gives N independent single-process runs without any error;
        # cpu=True makes it initialise a gloo process group instead.
        cpu = launched > 1 and not has_gpu()
    requested = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if requested == "fp16" and (cpu or not has_gpu()):
        # Refused before the Accelerator exists: its state is the process's, and
        # once made with fp16 every later trainer in the process would get fp16.
        raise fp16_refused("cpu")
    kwargs: dict[str, Any] = dict(accelerator_kwargs)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        # The core steps schedulers once per optimizer step (or epoch), and not
        # after a skipped step; accelerate would step them once per process.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(
            split_batches=split_batches,
            # Every process draws the same permutation from (seed, epoch).
            use_seedable_sampler=True,
        ),
        kwargs_handlers=handlers,
        **kwargs,
    )
    if accelerator.num_processes > 1:
        destroy_process_group_at_exit()
    if accelerator.num_processes != launched:
        raise ConfigurationError(
            f"accelerate: the script was launched as {launched} processes but the "
            f"Accelerator sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); the processes would "
            f"train independently. On a machine without a GPU pass cpu=True (or set "
            f"ACCELERATE_USE_CPU=1), and {LAUNCH_HINT}."
        )
    silent_fp32 = (
        accelerator.mixed_precision == "fp16"
        and not accelerator.native_amp
        and accelerator.distributed_type
        not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    )
    if silent_fp32:
        raise fp16_refused(accelerator.device)
    return accelerator
