"""Record a fit with validation and print every hook call, indented by phase.

The configuration is the one of tests/test_hook_order.py, the ground truth of
hook order; the test suite checks that this output (hook_order.txt, shown in the
docs) equals a live recording.
"""

from hooktrain.testing import HookCall, run


def describe(call: HookCall) -> str:
    shown = {k: call.kwargs[k] for k in ("batch_idx", "stage", "scope") if k in call.kwargs}
    return f"{call.name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def outline(calls: list[HookCall]) -> list[str]:
    lines, depth = [], 0
    for call in calls:
        name = call.name
        if name == "teardown" or (name.endswith("_end") and name.startswith("on_")):
            depth -= 1
        lines.append("    " * depth + describe(call))
        if name == "setup" or (name.endswith("_start") and name.startswith("on_")):
            depth += 1
    return lines


if __name__ == "__main__":
    result = run(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=2,
        gradient_clip_val=1.0,
    )
    print("\n".join(outline(result.calls)))
