"""The ``faults`` plugin: one fault, injected at a named hook and global step.

For plugin authors (the conformance suite, `hooktrain.testing.PluginConformance`,
uses it) and for operators proving that a setup survives preemption::

    Trainer(plugins=[("checkpoint", {}), ("faults", {"hook": "on_train_batch_end",
                                                     "step": 5, "fault": "sigterm"})])

The fault fires once, at the first call of ``hook`` at which
``trainer.global_step == step`` (optimizer steps done so far: in
``on_train_batch_end`` it counts that batch's step, in ``on_train_batch_start`` it
does not), on the process whose ``trainer.global_rank`` is ``rank``:

* ``sigterm`` / ``sigkill``: the process sends itself the real signal
  (``os.kill``), as a cluster scheduler would; what follows is whatever the
  process's handlers make of it (the checkpoint plugin saves and stops on SIGTERM;
  SIGKILL ends the process).
* ``exception``: raises `InjectedFault` from the hook; it reaches the caller as a
  ``HookError`` naming the plugin ``faults``.
* ``nan_loss``: the training loss of that step becomes NaN (``hook`` must be
  ``forward_step``, which this plugin then wraps); the core's finite check raises
  ``NonFiniteLossError`` at the next log interval, or at once with
  ``check_finite_every_step=True``.

A fault that never fired (the hook was not called at that step) is reported on
stderr when the stage ends. Rerunning a command with the fault still selected fires
it again if the run reaches that step again.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from hooktrain.errors import ConfigurationError, closest_name
from hooktrain.hookcalls import HOOK_NAMES
from hooktrain.markers import hookimpl

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["FAULTS", "Faults", "InjectedFault"]

#: The faults this plugin injects.
FAULTS = ("sigterm", "sigkill", "exception", "nan_loss")


class InjectedFault(RuntimeError):
    """The exception the ``exception`` fault raises."""


class Faults:
    """Injects ``fault`` at the first call of ``hook`` at global step ``step``.

    :param hook: a hook name (``hooktrain plugins --hooks`` lists them).
    :param step: the global step (optimizer steps done), at least 0.
    :param fault: ``"sigterm"``, ``"sigkill"``, ``"exception"`` or ``"nan_loss"``.
    :param rank: the process that faults (``trainer.global_rank``).
    :raises ConfigurationError: when the trainer is built, for an unknown hook or
        fault, a negative step or rank, or ``nan_loss`` at another hook than
        ``forward_step``; when the stage starts, for a rank the run does not have.
    """

    name = "faults"

    def __init__(self, hook: str, step: int, fault: str, rank: int = 0) -> None:
        if hook not in HOOK_NAMES:
            close = closest_name(hook, HOOK_NAMES)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigurationError(
                f"faults: hook {hook!r} is not a hooktrain hook{hint} "
                f"('hooktrain plugins --hooks' lists them)"
            )
        if fault not in FAULTS:
            raise ConfigurationError(
                f"faults: fault must be one of {', '.join(FAULTS)}, got {fault!r}"
            )
        for option, value in (("step", step), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"faults: {option} must be an integer >= 0, got {value!r}")
        if fault == "nan_loss" and hook != "forward_step":
            raise ConfigurationError(
                f"faults: nan_loss replaces the loss the training step returns, so it needs "
                f"hook='forward_step', got {hook!r}"
            )
        self.hook = hook
        self.step = step
        self.fault = fault
        self.rank = rank
        #: Whether the fault has fired (in this process).
        self.fired = False
        # An attribute of the instance, implementing the chosen hook under its own
        # name (specname): the plugin's own setup and teardown stay usable whatever
        # hook was chosen.
        self._inject = self._nan_injector() if fault == "nan_loss" else self._injector()

    def __repr__(self) -> str:
        return (
            f"Faults(hook={self.hook!r}, step={self.step}, fault={self.fault!r}, rank={self.rank})"
        )

    def _due(self, trainer: Trainer) -> bool:
        return (
            not self.fired and trainer.global_step == self.step and trainer.global_rank == self.rank
        )

    def _injector(self) -> Any:
        def inject(trainer: Trainer) -> None:
            if self._due(trainer):
                self.fired = True
                self._fire(trainer)

        return hookimpl(specname=self.hook)(inject)

    def _nan_injector(self) -> Any:
        def inject(trainer: Trainer, stage: str) -> Generator[None, Any, Any]:
            result = yield
            if stage != "train" or not self._due(trainer):
                return result
            self.fired = True
            self._say(trainer, "making the training loss NaN")
            if isinstance(result, dict) and "loss" in result:
                return {**result, "loss": result["loss"] * float("nan")}
            return result * float("nan")

        return hookimpl(specname="forward_step", wrapper=True)(inject)

    def _say(self, trainer: Trainer, what: str) -> None:
        print(
            f"hooktrain-faults: {what} at hook {self.hook}, global step {self.step}, "
            f"rank {trainer.global_rank} (pid {os.getpid()})",
            file=sys.stderr,
            flush=True,
        )

    def _fire(self, trainer: Trainer) -> None:
        if self.fault == "exception":
            raise InjectedFault(
                f"injected fault at hook {self.hook}, global step {self.step}, "
                f"rank {trainer.global_rank}"
            )
        sig = signal.SIGTERM if self.fault == "sigterm" else signal.SIGKILL
        self._say(trainer, f"sending {sig.name}")
        # The main thread sending itself a signal: a Python handler runs before
        # os.kill returns to the next line; SIGKILL ends the process here.
        os.kill(os.getpid(), sig)

    @hookimpl(trylast=True)
    def setup(self, trainer: Trainer) -> None:
        # trylast: after every plugin that sets the world size (accelerate) has.
        if self.rank >= trainer.world_size:
            raise ConfigurationError(
                f"faults: rank={self.rank}, but the run has {trainer.world_size} "
                f"process{'es' if trainer.world_size > 1 else ''}"
            )

    @hookimpl(trylast=True)
    def teardown(self, trainer: Trainer, stage: str) -> None:
        if stage == "fit" and not self.fired and trainer.global_rank == self.rank:
            print(
                f"hooktrain-faults: the fault {self.fault!r} never fired: hook {self.hook} was "
                f"not called at global step {self.step} on rank {self.rank}",
                file=sys.stderr,
            )
