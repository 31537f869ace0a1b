"""Running a stage, and saying where an error came from.

Every entry point (``fit``, ``validate``, ``test``, ``predict``) runs its body
between ``setup`` and ``teardown``; when anything raises, ``on_exception`` runs
first and the error leaves naming the plugin and hook that raised it, with the
epoch and the step.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Mapping
from types import CodeType
from typing import TYPE_CHECKING, Any

from hooktrain import hookspecs
from hooktrain.batches import unwrap_compiled
from hooktrain.errors import (
    ConfigurationError,
    HookError,
    HooktrainError,
    NonFiniteLossError,
    PluginError,
)
from hooktrain.hookcalls import HOOK_NAMES
from hooktrain.instrument import implementation_code
from hooktrain.manager import answers_with_an_iterable
from hooktrain.options import check_loss_fn, check_metrics
from hooktrain.publishing import warn_if_never_published
from hooktrain.rng import seed_everything

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hooktrain.trainer import Trainer

__all__ = ["begin_stage", "call_each", "explain", "run_stage"]


def begin_stage(
    trainer: Trainer,
    stage: str,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor] | None,
    metrics: Mapping[str, Any] | None,
) -> None:
    """Check the stage's loss and metrics, and make ``model`` the trainer's.

    :raises ConfigurationError: for a loss or metrics that cannot be used, and
        when another stage of this trainer is running (a hook called
        ``trainer.validate()`` during ``fit``).
    """
    running = trainer._running_stage
    if running is not None:
        # The stage would take the running one's model, loss, stop flag and stage
        # name, and its teardown would close the running one's loggers.
        advice = (
            "; to evaluate another dataset during fit, give fit a list of validation "
            "dataloaders (fit(model, train, [val, other])), whose metrics get the "
            "suffix /dataloader_idx_1"
            if running == "fit" and stage != "fit"
            else ""
        )
        raise ConfigurationError(
            f"{stage}() was called while this trainer's {running}() runs (from a hook?): "
            f"a trainer runs one stage at a time{advice}"
        )
    check_loss_fn(loss_fn)
    check_metrics(metrics)
    trainer.model = model
    # torch.compile(module) is a wrapper: the user's module is the one inside
    # (checkpoints hold its keys, its steps are found on it), and the wrapper
    # stays the model the loop runs.
    trainer.module = unwrap_compiled(model)
    trainer.loss_fn = loss_fn
    trainer.metric_fns = dict(metrics or {})
    trainer.should_stop = False


def run_stage(trainer: Trainer, stage: str, body: Callable[[], Any]) -> Any:
    """``setup``, ``body()``, ``teardown``; on any exception ``on_exception`` first.

    :return: what ``body`` returned.
    :raises HookError: when a plugin's implementation raised (the original is its
        ``__cause__``); any other exception propagates with a note saying where.
    """
    trainer.stage = trainer._running_stage = stage
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
        for error in call_each(trainer, "on_exception", {"trainer": trainer, "exception": failure}):
            print(f"hooktrain: on_exception raised after an error: {error}", file=sys.stderr)
        if failure is exc:
            raise
        raise failure from exc
    finally:
        try:
            errors = call_each(trainer, "teardown", {"trainer": trainer, "stage": stage})
        finally:
            # Even after a Ctrl-C in teardown, a notebook's next stage may run.
            trainer._running_stage = None
        trainer._active_means = None
        trainer._log_prefix = ""
        # Names still pending have no later publication to go to; cleared first, so
        # that a failing teardown or a warning raised as an error leaves none to the
        # next stage.
        pending = set(trainer._logged_since_publish)
        trainer._logged_since_publish.clear()
        trainer._logged_outside_batches.clear()
        if errors and failure is None:
            # A plugin's sys.exit after a stage that went well: every other teardown
            # has run by now, and the process ends as the plugin asked.
            cause = errors[0].__cause__
            raise cause if isinstance(cause, SystemExit) else errors[0]
        for error in errors:
            print(f"hooktrain: teardown raised after an error: {error}", file=sys.stderr)
        if failure is None:
            warn_if_never_published(trainer, pending)


def call_each(trainer: Trainer, hook_name: str, kwargs: dict[str, Any]) -> list[BaseException]:
    """Call a clean-up hook (``on_exception``, ``teardown``) so that one plugin
    raising does not keep the others from flushing their files.

    pluggy stops a call at the first implementation that raises; every plain
    implementation it had not called is then called here, once, in its order:
    those after a plain one that raised (found in the error's traceback, or in
    that of the error it chains to, when a wrapper turned it into its own), or all
    of them when a wrapper raised before its ``yield``, before pluggy called any.
    Wrappers are not run again: theirs ran around the first call. A plugin's
    ``SystemExit`` counts as its error; ``KeyboardInterrupt`` stops the clean-up.

    :return: what was raised, in call order, each as `explain` words it: empty
        when every implementation returned.
    """
    caller = getattr(trainer.plugin_manager.hook, hook_name)
    reached: list[bool] = []

    def mark_reached() -> None:
        # pluggy calls a temporary implementation after the tryfirst plain ones
        # and before the others: a wrapper failing before its yield stops the
        # call before all of them.
        reached.append(True)

    try:
        caller.call_extra([mark_reached], kwargs)
        return []
    except (Exception, SystemExit) as exc:
        errors = [_explained(trainer, exc)]
        raised = exc
    plain = [
        impl for impl in reversed(caller.get_hookimpls()) if not (impl.wrapper or impl.hookwrapper)
    ]
    failed = _failed_implementation(raised, plain)
    if failed is not None:
        left = plain[failed + 1 :]
    elif not reached:
        left = plain
    else:
        return errors  # a wrapper raised after every plain implementation returned
    for impl in left:
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except (Exception, SystemExit) as exc:
            errors.append(_explained(trainer, exc))
    return errors


def _failed_implementation(exc: BaseException, plain: list[Any]) -> int | None:
    """The index in ``plain`` of the implementation that raised ``exc``, or the
    error ``exc`` chains to; ``None`` when none of them did."""
    owners: dict[Any, list[tuple[Any, int]]] = {}
    for index, impl in enumerate(plain):
        owners.setdefault(implementation_code(impl.function), []).append((impl.plugin, index))
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = _innermost(error, owners)
        if found is not None:
            return found
        error = error.__cause__ or error.__context__
    return None


def _innermost(exc: BaseException, owners: dict[Any, list[tuple[Any, Any]]]) -> Any:
    """Of ``owners`` (code object to ``(plugin, value)`` pairs), the value of the
    innermost frame of ``exc``'s traceback that runs one of those codes."""
    found = None
    traceback = exc.__traceback__
    while traceback is not None:
        candidates = owners.get(traceback.tb_frame.f_code)
        if candidates:
            # Two instances of one plugin class share their functions' code: the
            # frame's ``self`` tells them apart.
            this = traceback.tb_frame.f_locals.get("self")
            found = next((v for plugin, v in candidates if plugin is this), candidates[0][1])
        traceback = traceback.tb_next
    return found


def _explained(trainer: Trainer, exc: BaseException) -> BaseException:
    # A plugin ending the process (sys.exit) from a clean-up hook would replace the
    # error being handled, unseen, and keep the other plugins from cleaning up: it
    # is reported as that plugin's error instead.
    error = explain(trainer, exc, exits_are_errors=isinstance(exc, SystemExit))
    if error is not exc and error.__cause__ is None:
        error.__cause__ = exc
    return error


def explain(trainer: Trainer, exc: BaseException, exits_are_errors: bool = False) -> BaseException:
    """A :class:`HookError` naming the plugin and the hook when a plugin raised
    ``exc``, else ``exc`` itself with a note saying where it happened.
    ``KeyboardInterrupt`` and ``SystemExit`` are nobody's fault (not even a plugin's)
    unless ``exits_are_errors`` counts a plugin's ``SystemExit`` as its error."""
    where = f"{trainer.stage} at epoch {trainer.current_epoch}, global step {trainer.global_step}"
    if isinstance(exc, HookError | PluginError):
        return exc
    # A non-finite loss is the run's fault, found by whoever looked (the core's
    # dump_checkpoint, called by a checkpoint plugin), not the looker's.
    attributable = (
        isinstance(exc, Exception) or (exits_are_errors and isinstance(exc, SystemExit))
    ) and not isinstance(exc, NonFiniteLossError)
    culprit = _culprit(trainer, exc) if attributable else None
    if culprit is None:
        exc.add_note(f"hooktrain: raised during {where}")
        if isinstance(exc, AttributeError) and exc.name in ("log", "log_dict"):
            import torch

            if isinstance(getattr(exc, "obj", None), torch.nn.Module):
                # Lightning's self.log, in a step moved over as it was.
                exc.add_note(
                    f"hooktrain: a model has no self.{exc.name}; log with "
                    f"trainer.log(name, value) on the Trainer your script built, or "
                    f"return the values from the step (a dict: every number of an "
                    f"evaluation step's is logged)"
                )
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
    hook); ``None`` when there is none or it is the core's. A hooktrain error the
    core raised (a refusal of what it was given) inside a plain implementation of
    another plugin, which called into the core (``trainer.restore_checkpoint`` in its
    ``prepare``), is that implementation's: the plugin gave the core what it refused.
    """
    manager = trainer.plugin_manager
    core = manager.get_plugin("core")
    owners: dict[Any, list[tuple[Any, tuple[Any, str]]]] = {}
    callers: dict[Any, list[tuple[Any, tuple[Any, str]]]] = {}
    for hook_name in HOOK_NAMES:
        # A hook answering with an iterable (batch_iterator) owns the functions
        # defined inside it too: the generator it returns runs after it returned.
        # Elsewhere a nested function (a closure around the model's forward) runs
        # the user's code.
        iterable = answers_with_an_iterable(inspect.signature(getattr(hookspecs, hook_name)))
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            code = implementation_code(impl.function)
            if code is None:
                continue
            for part in _with_nested(code) if iterable else [code]:
                owners.setdefault(part, []).append((impl.plugin, (impl.plugin, hook_name)))
                # A wrapper around the core's implementation of its own hook surrounds
                # the user's code that implementation runs (the model's step): blaming
                # it would blame a precision plugin for the model's error.
                if impl.plugin is not core and not (impl.wrapper or impl.hookwrapper):
                    callers.setdefault(part, []).append((impl.plugin, (impl.plugin, hook_name)))
    # First: a correct wrapper around the failing one re-raises pluggy's error from
    # its own frame, which the traceback walk would blame.
    found = _wrapper_that_failed_to_yield(exc, owners)
    if found is None:
        found = _innermost(exc, owners)
    if found is not None and found[0] is core:
        # The user's code the core ran (a model's validation_step, run by the core's
        # forward_step that a plugin called) raises its own errors, which stay the
        # user's.
        found = _innermost(exc, callers) if isinstance(exc, HooktrainError) else None
    if found is None:
        return None
    return manager.get_name(found[0]) or "?", found[1]


def _with_nested(code: CodeType) -> list[CodeType]:
    """``code`` and the code of every function, generator and lambda defined in it."""
    found = [code]
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            found.extend(_with_nested(constant))
    return found


# pluggy's words for a wrapper that returned without yielding or yielded twice. Its
# traceback runs through pluggy alone, and the words name the generator's code (its
# name, file and first line), not the plugin.
_WRAPPER_FAILED = re.compile(
    r"wrap_controller at '([^']*)' (.*):(\d+) (?:did not yield|has second yield)"
)


def _wrapper_that_failed_to_yield(exc: BaseException, owners: dict[Any, list[Any]]) -> Any:
    match = _WRAPPER_FAILED.fullmatch(str(exc)) if type(exc) is RuntimeError else None
    if match is None:
        return None
    where = (match[1], match[2], int(match[3]))
    for code, candidates in owners.items():
        if (code.co_name, code.co_filename, code.co_firstlineno) == where:
            return candidates[0][1]
    return None


def _move_module(module: Any, device: Any) -> None:
    """``module.to(device)``, skipped when every parameter and buffer is there
    already: ``to`` rebuilds every tensor's wrapper through a recursive walk, a
    tenth of a millisecond a stage for a small model, for nothing."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device != device:
            module.to(device)
            return
