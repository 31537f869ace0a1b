"""The loop calls plain implementations directly, without pluggy's call loop; it
must give exactly what pluggy gives: the same order, the same arguments, the same
results, the same first result, and wrappers still honoured."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hooktrain import hookimpl
from hooktrain.hookcalls import direct_caller as _direct_caller
from hooktrain.testing import run


class Calls:
    def __init__(self) -> None:
        self.order: list[str] = []


def _plugins(calls: Calls) -> list[Any]:
    class First:
        @hookimpl(tryfirst=True)
        def on_train_batch_end(self, batch_idx: int) -> str:
            calls.order.append(f"first:{batch_idx}")
            return "first"

    class Plain:
        @hookimpl
        def on_train_batch_end(self) -> None:
            calls.order.append("plain")

    class Last:
        @hookimpl(trylast=True)
        def on_train_batch_end(self, trainer: Any, outputs: Any, batch: Any) -> str:
            calls.order.append(f"last:{trainer.global_step}:{type(outputs).__name__}")
            return "last"

    return [Plain(), Last(), First()]


def test_direct_and_pluggy_calls_agree_on_order_arguments_and_results() -> None:
    calls = Calls()
    result = run(_plugins(calls), max_epochs=1, limit_train_batches=2, record=False)
    trainer = result.trainer
    seen_in_the_loop = list(calls.order)
    assert seen_in_the_loop == [
        "first:0",
        "plain",
        "last:1:dict",
        "first:1",
        "plain",
        "last:2:dict",
    ]

    kwargs = {"trainer": trainer, "outputs": {}, "batch": None, "batch_idx": 7}
    calls.order.clear()
    through_pluggy = trainer.plugin_manager.hook.on_train_batch_end(**kwargs)
    pluggy_order = list(calls.order)
    calls.order.clear()
    direct = trainer._hooks.on_train_batch_end
    assert direct is not trainer.plugin_manager.hook.on_train_batch_end
    assert direct(**kwargs) == through_pluggy == ["first", "last"]
    assert calls.order == pluggy_order


def test_a_first_result_hook_stops_at_the_first_answer_as_pluggy_does() -> None:
    asked: list[str] = []

    class Declines:
        @hookimpl(tryfirst=True)
        def transfer_batch_to_device(self, batch: Any) -> None:
            asked.append("declines")

    class Answers:
        @hookimpl
        def transfer_batch_to_device(self, batch: Any, device: torch.device) -> Any:
            asked.append("answers")
            return ("moved", batch) if isinstance(batch, int) else batch

    result = run([Answers(), Declines()], max_epochs=1, limit_train_batches=1, record=False)
    trainer = result.trainer
    caller = trainer.plugin_manager.hook.transfer_batch_to_device
    impls = caller.get_hookimpls()
    direct = _direct_caller(impls, firstresult=True)
    kwargs = {"trainer": trainer, "batch": 3, "device": torch.device("cpu")}
    asked.clear()
    assert direct(**kwargs) == caller(**kwargs) == ("moved", 3)
    # Each call asked the declining one first, then the one that answered; the
    # core's default (trylast) was never reached.
    assert asked == ["declines", "answers", "declines", "answers"]


def test_a_hook_with_a_wrapper_keeps_going_through_pluggy() -> None:
    class Wraps:
        @hookimpl(wrapper=True)
        def on_train_batch_end(self) -> Any:
            return (yield)

    class Plain:
        @hookimpl
        def on_train_batch_end(self) -> None:
            pass

    result = run([Wraps(), Plain()], max_epochs=1, limit_train_batches=1, record=False)
    trainer = result.trainer
    assert trainer._hooks.on_train_batch_end is trainer.plugin_manager.hook.on_train_batch_end


def test_an_error_in_a_directly_called_hook_names_the_plugin() -> None:
    from hooktrain.errors import HookError

    class Breaks:
        @hookimpl
        def on_train_batch_end(self, batch_idx: int) -> None:
            raise ValueError(f"broken at {batch_idx}")

    with pytest.raises(HookError, match=r"plugin 'Breaks' raised in hook 'on_train_batch_end'"):
        run([Breaks()], max_epochs=1, limit_train_batches=2, record=False)


@pytest.mark.parametrize("returns", [None, "seen"])
def test_a_single_implementation_is_called_as_pluggy_calls_it(returns: Any) -> None:
    # One implementation gets a caller of its own, without the loop over several.
    seen: list[int] = []

    class One:
        @hookimpl
        def on_train_batch_end(self, batch_idx: int) -> Any:
            seen.append(batch_idx)
            return returns

    result = run([One()], max_epochs=1, limit_train_batches=2, record=False)
    trainer = result.trainer
    pluggy_caller = trainer.plugin_manager.hook.on_train_batch_end
    direct = trainer._hooks.on_train_batch_end
    assert direct is not pluggy_caller
    kwargs = {"trainer": trainer, "outputs": {}, "batch": None, "batch_idx": 7}
    expected = [] if returns is None else [returns]
    assert direct(**kwargs) == pluggy_caller(**kwargs) == expected
    assert seen == [0, 1, 7, 7]

    # A first-result hook with one implementation returns its result itself.
    (impl,) = [i for i in pluggy_caller.get_hookimpls() if isinstance(i.plugin, One)]
    assert _direct_caller([impl], firstresult=True)(**kwargs) == returns
