"""Ranked checkpoints whose names repeat: a kept checkpoint is never overwritten by
another save that resolves to the same name; the newcomer gets ``-v1``, ``-v2``..."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint, load_file, read_info
from torch import nn

from hooktrain import HookError, Trainer, hookimpl
from hooktrain.testing import make_data


class ValLosses:
    """Logs a chosen validation loss for each epoch (``val_loss``, replacing the
    computed one) when validation ends, before the checkpoint plugin saves."""

    name = "val_losses"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @hookimpl
    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        trainer.log("loss", self.values[trainer.current_epoch])


def fit(
    directory: Path,
    values: list[float],
    ckpt_path: str | None = None,
    *extra: Any,
    **options: Any,
) -> ModelCheckpoint:
    """One epoch of two batches per value, each epoch ending with a ranked save."""
    checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", **options)
    trainer = Trainer(
        plugins=[ValLosses(values), checkpoint, *extra],
        max_epochs=len(values),
        seed=0,
        device="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
    )
    train, val = make_data(n=64, batch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    trainer.fit(
        model,
        train,
        val,
        loss_fn=F.cross_entropy,
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
        ckpt_path=ckpt_path,
    )
    return checkpoint


def held(directory: Path) -> dict[str, tuple[int, float]]:
    """Each checkpoint file: the epoch and the ``val_loss`` it holds."""
    found = {}
    for path in sorted(directory.glob("*.ckpt")):
        state, info = load_file(path)
        assert info is not None
        found[path.name] = (int(info.record["epoch"]), state["metrics"]["val_loss"])
    return found


def test_a_worse_checkpoint_does_not_overwrite_a_better_one_of_the_same_name(
    tmp_path: Path,
) -> None:
    checkpoint = fit(tmp_path, [1.0, 2.0], save_top_k=1, filename="best")
    assert held(tmp_path) == {"best.ckpt": (0, 1.0), "last.ckpt": (1, 2.0)}
    assert checkpoint.best_k_models == {"best.ckpt": 1.0}
    assert checkpoint.best_model_path == tmp_path / "best.ckpt"


def test_a_better_checkpoint_takes_the_name_of_the_one_it_evicts(tmp_path: Path) -> None:
    checkpoint = fit(tmp_path, [2.0, 1.0], save_top_k=1, filename="best")
    assert held(tmp_path) == {"best.ckpt": (1, 1.0), "last.ckpt": (1, 1.0)}
    assert checkpoint.best_k_models == {"best.ckpt": 1.0}


@pytest.mark.parametrize(
    ("top_k", "values", "expected"),
    [
        # The second save ranks but its name is taken; the third evicts the worst
        # (best-v1), whose name is then free, while best.ckpt (1.0) stays.
        (2, [1.0, 2.0, 0.5], {"best.ckpt": (0, 1.0), "best-v1.ckpt": (2, 0.5)}),
        (
            -1,
            [1.0, 2.0, 3.0],
            {"best.ckpt": (0, 1.0), "best-v1.ckpt": (1, 2.0), "best-v2.ckpt": (2, 3.0)},
        ),
    ],
)
def test_several_kept_checkpoints_with_one_name_are_versioned(
    tmp_path: Path, top_k: int, values: list[float], expected: dict[str, tuple[int, float]]
) -> None:
    checkpoint = fit(tmp_path, values, save_top_k=top_k, filename="best")
    last_epoch = len(values) - 1
    assert held(tmp_path) == {**expected, "last.ckpt": (last_epoch, values[-1])}
    assert checkpoint.best_k_models == {name: loss for name, (_, loss) in expected.items()}


def test_a_ranked_name_of_last_leaves_last_ckpt_to_the_newest_state(tmp_path: Path) -> None:
    # last.ckpt is a hard link to the ranked file after a ranked save; replacing it
    # with the next state must not change the ranked file through the link.
    checkpoint = fit(tmp_path, [1.0, 2.0], save_top_k=1, filename="last")
    assert held(tmp_path) == {"last-ranked.ckpt": (0, 1.0), "last.ckpt": (1, 2.0)}
    assert checkpoint.best_k_models == {"last-ranked.ckpt": 1.0}


def test_a_resumed_run_keeps_the_better_checkpoint_of_the_same_name(tmp_path: Path) -> None:
    fit(tmp_path, [1.0, 2.0], save_top_k=1, filename="best")
    # The resumed run's ranking starts from the saved one: 3.0 does not rank...
    checkpoint = fit(tmp_path, [1.0, 2.0, 3.0], "last", save_top_k=1, filename="best")
    assert held(tmp_path) == {"best.ckpt": (0, 1.0), "last.ckpt": (2, 3.0)}
    assert checkpoint.best_k_models == {"best.ckpt": 1.0}
    # ...and 0.5 replaces it under its name.
    checkpoint = fit(tmp_path, [1.0, 2.0, 3.0, 0.5], "last", save_top_k=1, filename="best")
    assert held(tmp_path) == {"best.ckpt": (3, 0.5), "last.ckpt": (3, 0.5)}
    assert checkpoint.best_k_models == {"best.ckpt": 0.5}


def test_step_wise_saves_with_a_repeating_name_keep_the_first_of_equal_scores(
    tmp_path: Path,
) -> None:
    # Both saves of an epoch (steps 3 and 4, then 5 and 6) read the val_loss of the
    # epoch before: the name repeats and the score ties, and a tie is not better.
    checkpoint = fit(
        tmp_path, [2.0, 1.0, 3.0], save_top_k=1, every_n_train_steps=1, filename="{val_loss:.1f}"
    )
    assert checkpoint.best_k_models == {"val_loss=1.0.ckpt": 1.0}
    assert read_info(tmp_path / "val_loss=1.0.ckpt").record["global_step"] == 5


class Crash(Exception):
    pass


class CrashBeforeValidation:
    """Raises when the validation of the given epoch starts: after the epoch's
    last batch (and a step-wise save there), before its end."""

    name = "crash_before_validation"

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    @hookimpl
    def on_validation_start(self, trainer: Trainer) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash


@pytest.mark.parametrize(
    ("filename", "expected", "step_4"),
    [
        (
            None,
            {"epoch=0-step=2.ckpt": (0, 1.0), "epoch=1-step=3.ckpt": (1, 1.0)},
            "epoch=1-step=4.ckpt",
        ),
        # Step 4 was saved as best-v2; its second save formats as "best".
        ("best", {"best.ckpt": (0, 1.0), "best-v1.ckpt": (1, 1.0)}, "best-v2.ckpt"),
    ],
)
def test_a_step_saved_again_at_the_epoch_end_replaces_its_own_file(
    tmp_path: Path, filename: str | None, expected: dict[str, tuple[int, float]], step_4: str
) -> None:
    # Step 4 ends epoch 1: saved by the step-wise trigger, ranked with epoch 0's
    # val_loss, then by the epoch-wise one, after epoch 1's validation. The same
    # weights, so the second takes the first's place with the fresh score, even a
    # worse one, instead of a second file.
    checkpoint = fit(
        tmp_path,
        [1.0, 2.0],
        save_top_k=-1,
        every_n_train_steps=1,
        every_n_epochs=1,
        filename=filename,
    )
    expected = {**expected, step_4: (1, 2.0)}
    assert held(tmp_path) == {**expected, "last.ckpt": (1, 2.0)}
    assert checkpoint.best_k_models == {name: loss for name, (_, loss) in expected.items()}
    assert read_info(tmp_path / step_4).record["epoch_complete"] is True


def test_after_a_resume_the_epoch_end_save_replaces_the_same_steps_file(tmp_path: Path) -> None:
    options: dict[str, Any] = {"save_top_k": -1, "every_n_train_steps": 1, "every_n_epochs": 1}
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, [1.0, 2.0], None, CrashBeforeValidation(1), **options)
    assert read_info(tmp_path / "epoch=1-step=4.ckpt").record["epoch_complete"] is False
    checkpoint = fit(tmp_path, [1.0, 2.0], "last", **options)
    assert checkpoint.best_k_models["epoch=1-step=4.ckpt"] == 2.0
    assert read_info(tmp_path / "epoch=1-step=4.ckpt").record["epoch_complete"] is True
    assert not list(tmp_path.glob("*-v1.ckpt"))


class ChangesDirectory:
    """Moves the process to ``elsewhere`` at the first epoch's end, before the save."""

    name = "changes_directory"

    def __init__(self, elsewhere: Path) -> None:
        self.elsewhere = elsewhere

    @hookimpl(tryfirst=True)
    def on_train_epoch_end(self) -> None:
        os.chdir(self.elsewhere)


def test_a_relative_dirpath_is_where_the_working_directory_was_when_it_was_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    checkpoint = fit(Path("ckpts"), [0.5, 0.4], None, ChangesDirectory(elsewhere))
    assert checkpoint.dirpath == started / "ckpts"
    kept = sorted(p.name for p in (started / "ckpts").iterdir())
    assert kept == ["epoch=1-step=4.ckpt", "last.ckpt"]  # the best of the two, and last
    assert not (elsewhere / "ckpts").exists()
    # Resumed from anywhere, "last" is the same file.
    resumed = fit(started / "ckpts", [0.5, 0.4, 0.3], "last")
    assert read_info(resumed.last_path).record["global_step"] == 6


def test_a_dirpath_under_the_home_directory_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelCheckpoint(dirpath="~/ckpts").dirpath == tmp_path / "ckpts"
