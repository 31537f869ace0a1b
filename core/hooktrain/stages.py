"""Running a stage, and saying where an error came from.

Every entry point (``fit``, ``validate``, ``test``, ``predict``) runs its body
between ``setup`` and ``teardown``; when anything raises, ``on_exception`` runs
first and the error leaves naming the plugin and hook that raised it, with the
epoch and the step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hooktrain.errors import HookError, PluginError
from hooktrain.hookcalls import HOOK_NAMES
from hooktrain.instrument import implementation_code
from hooktrain.rng import seed_everything

if TYPE_CHECKING:
    from hooktrain.trainer import Trainer

__all__ = ["explain", "run_stage"]


def run_stage(trainer: Trainer, stage: str, body: Callable[[], Any]) -> Any:
    """``setup``, ``body()``, ``teardown``; on any exception ``on_exception`` first.

    :return: what ``body`` returned.
    :raises HookError: when a plugin's implementation raised (the original is its
        ``__cause__``); any other exception propagates with a note saying where.
    """
    trainer.stage = stage
    hook = trainer.plugin_manager.hook
    failure: BaseException | None = None
    try:
        if trainer.seed is not None:
            seed_everything(trainer.seed)
        hook.setup(trainer=trainer, stage=stage)
        # Each body resolves hooks after prepare (which may wrap or register
        # things); until then nothing is published.
        trainer._hooks = None
        _move_module(trainer.module, trainer.device)
        return body()
    except BaseException as exc:
        failure = explain(trainer, exc)
        try:
            hook.on_exception(trainer=trainer, exception=failure)
        except Exception as inner:
            print(f"hooktrain: on_exception itself raised: {inner!r}", file=sys.stderr)
        if failure is exc:
            raise
        raise failure from exc
    finally:
        try:
            hook.teardown(trainer=trainer, stage=stage)
        except Exception as exc:
            if failure is None:
                raise explain(trainer, exc) from exc
            print(f"hooktrain: teardown raised after an error: {exc!r}", file=sys.stderr)
        trainer._active_means = None
        trainer._log_prefix = ""
        # Names logged after the stage's last publication have no later one to go to.
        trainer._logged_since_publish.clear()


def explain(trainer: Trainer, exc: BaseException) -> BaseException:
    """A :class:`HookError` naming the plugin and the hook when a plugin raised
    ``exc``, else ``exc`` itself with a note saying where it happened."""
    where = f"{trainer.stage} at epoch {trainer.current_epoch}, global step {trainer.global_step}"
    if isinstance(exc, HookError | PluginError):
        return exc
    culprit = _culprit(trainer, exc) if isinstance(exc, Exception) else None
    if culprit is None:
        exc.add_note(f"hooktrain: raised during {where}")
        return exc
    plugin, hook_name = culprit
    return HookError(
        f"plugin {plugin!r} raised in hook {hook_name!r} during {where}: "
        f"{type(exc).__name__}: {exc}",
        plugin=plugin,
        hook=hook_name,
    )


def _culprit(trainer: Trainer, exc: BaseException) -> tuple[str, str] | None:
    """The innermost plugin implementation in ``exc``'s traceback, as (plugin,
    hook); ``None`` when there is none or it is the core's."""
    manager = trainer.plugin_manager
    owners: dict[Any, tuple[str, str]] = {}
    for hook_name in HOOK_NAMES:
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            code = implementation_code(impl.function)
            if code is not None:
                owners[code] = (manager.get_name(impl.plugin) or "?", hook_name)
    found = None
    traceback = exc.__traceback__
    while traceback is not None:
        owner = owners.get(traceback.tb_frame.f_code)
        if owner is not None:
            found = owner
        traceback = traceback.tb_next
    if found is None or found[0] == "core":
        return None
    return found


def _move_module(module: Any, device: Any) -> None:
    """``module.to(device)``, skipped when every parameter and buffer is there
    already: ``to`` rebuilds every tensor's wrapper through a recursive walk, a
    tenth of a millisecond a stage for a small model, for nothing."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device != device:
            module.to(device)
            return
