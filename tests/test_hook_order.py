"""The ground truth of hook order.

This test records every hook call of a whole ``fit`` with validation and asserts
the exact sequence. docs/hook-order.md shows the same sequence; the hookspecs
module docstring spells it out. Changing either without this test is a bug.
"""

from __future__ import annotations

from hooktrain.testing import HookRecorder, run


def _described(calls):
    described = []
    for call in calls:
        shown = {k: call.kwargs[k] for k in ("batch_idx", "stage", "scope") if k in call.kwargs}
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        described.append(f"{call.name}({args})")
    return described


def train_batch(i: int) -> list[str]:
    return [
        "transfer_batch_to_device()",
        f"on_train_batch_start(batch_idx={i})",
        f"forward_step(batch_idx={i}, stage='train')",
        "on_before_backward()",
        "backward()",
        "on_after_backward()",
        "unscale_gradients()",
        "on_before_optimizer_step()",
        "clip_gradients()",
        "optimizer_step()",
        "on_before_zero_grad()",
        "compute_metrics(stage='train')",  # fit was given metrics=
        f"on_train_batch_end(batch_idx={i})",
    ]


VALIDATION = [
    "on_validation_start()",
    "on_validation_epoch_start()",
    "batch_iterator(stage='validate')",
    "transfer_batch_to_device()",
    "on_validation_batch_start(batch_idx=0)",
    "forward_step(batch_idx=0, stage='validate')",
    "gather_for_metrics()",
    "compute_metrics(stage='validate')",
    "on_validation_batch_end(batch_idx=0)",
    "on_validation_epoch_end()",
    "on_validation_end()",
    "log_metrics(scope='validate')",
]

EPOCH = [
    "on_train_epoch_start()",
    "batch_iterator(stage='train')",
    *train_batch(0),
    *train_batch(1),
    "log_metrics(scope='step')",  # log_every_n_steps=2
    *VALIDATION,
    "on_train_epoch_end()",
    "log_metrics(scope='epoch')",
]

FIT = [
    "setup(stage='fit')",
    "prepare(stage='fit')",
    "on_fit_start()",
    *EPOCH,
    *EPOCH,
    "on_fit_end()",
    "teardown(stage='fit')",
]


def test_fit_with_validation_calls_every_hook_in_the_documented_order():
    result = run(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=2,
        gradient_clip_val=1.0,
    )
    assert _described(result.calls) == FIT


def test_step_validation_runs_inside_the_batch_before_its_end_hook():
    result = run(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        val_every_n_steps=1,
        check_val_every_n_epoch=1,
        log_every_n_steps=100,
    )
    names = [c.name for c in result.calls]
    first_end = names.index("on_train_batch_end")
    first_validation = names.index("on_validation_start")
    assert names.index("optimizer_step") < first_validation < first_end
    # Two step validations; the epoch's own would see the weights of the second.
    assert names.count("on_validation_start") == 2


def test_limit_val_batches_zero_turns_validation_in_fit_off():
    # As in Lightning: the validation hooks used to run around no batch, and a
    # plugin reading the empty validation took it as one that computed nothing.
    result = run(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        val_every_n_steps=1,
        log_every_n_steps=2,
    )
    names = [c.name for c in result.calls]
    assert names.count("on_train_batch_end") == 4
    assert not [name for name in names if "validation" in name]
    assert [c.kwargs["stage"] for c in result.calls if c.name == "batch_iterator"] == ["train"] * 2


def test_accumulation_steps_the_optimizer_once_per_window():
    result = run(
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, accumulate_grad_batches=2
    )
    names = [c.name for c in result.calls]
    assert names.count("backward") == 4
    assert names.count("optimizer_step") == 2
    assert names.count("on_before_zero_grad") == 2
    assert result.trainer.global_step == 2
    # The optimizer steps after the second and fourth backward only.
    pattern = [n for n in names if n in ("backward", "optimizer_step")]
    assert pattern == ["backward", "backward", "optimizer_step"] * 2


def test_validate_test_and_predict_sequences():
    validate = _described(run(stage="validate", limit_val_batches=1).calls)
    assert validate == [
        "setup(stage='validate')",
        "prepare(stage='validate')",
        *VALIDATION,
        "teardown(stage='validate')",
    ]
    test = [c.name for c in run(stage="test", limit_test_batches=1).calls]
    assert test == [
        "setup",
        "prepare",
        "on_test_start",
        "on_test_epoch_start",
        "batch_iterator",
        "transfer_batch_to_device",
        "on_test_batch_start",
        "forward_step",
        "gather_for_metrics",
        "compute_metrics",
        "on_test_batch_end",
        "on_test_epoch_end",
        "on_test_end",
        "log_metrics",
        "teardown",
    ]
    predict = [c.name for c in run(stage="predict", limit_predict_batches=1).calls]
    assert predict == [
        "setup",
        "prepare",
        "on_predict_start",
        "on_predict_epoch_start",
        "batch_iterator",
        "transfer_batch_to_device",
        "on_predict_batch_start",
        "forward_step",
        "on_predict_batch_end",
        "on_predict_epoch_end",
        "on_predict_end",
        "teardown",
    ]


def test_observer_hooks_alone_see_the_same_order():
    # A plain run's plugins mostly watch batch ends and publications: with only those
    # two hooks implemented, every other hook is skipped, and the order they see must
    # still be the ground truth's.
    observed = ("on_train_batch_end", "log_metrics")
    recorder = HookRecorder(hooks=observed)
    run(
        [recorder],
        record=False,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=2,
        gradient_clip_val=1.0,
    )
    expected = [call for call in FIT if call.split("(")[0] in observed]
    assert _described(recorder.calls) == expected
    assert len(expected) == 2 * 2 + 3 * 2  # two batch ends and three publications an epoch
