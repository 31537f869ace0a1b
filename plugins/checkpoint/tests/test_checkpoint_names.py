"""Ranked checkpoints whose names repeat: a kept checkpoint is never overwritten by
another save that resolves to the same name; the newcomer gets ``-v1``, ``-v2``..."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint, load_file, read_info, topk
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
    val_every_n_steps: int | None = None,
    **options: Any,
) -> ModelCheckpoint:
    """One epoch of two batches per value, each epoch ending with a ranked save."""
    options.setdefault("monitor", "val_loss")
    checkpoint = ModelCheckpoint(dirpath=directory, **options)
    trainer = Trainer(
        plugins=[ValLosses(values), checkpoint, *extra],
        max_epochs=len(values),
        seed=0,
        device="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
        val_every_n_steps=val_every_n_steps,
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
    # Validated at every step, both saves of an epoch (steps 3 and 4 the second)
    # score that epoch's val_loss: the name repeats and the score ties, and a tie
    # is not better.
    checkpoint = fit(
        tmp_path,
        [2.0, 1.0, 3.0],
        save_top_k=1,
        every_n_train_steps=1,
        filename="{val_loss:.1f}",
        val_every_n_steps=1,
    )
    assert checkpoint.best_k_models == {"val_loss=1.0.ckpt": 1.0}
    assert read_info(tmp_path / "val_loss=1.0.ckpt").record["global_step"] == 3


def test_weights_that_were_not_validated_are_not_ranked_by_a_validation_metric(
    tmp_path: Path,
) -> None:
    # Step-wise saves between validations (steps 1 and 3, and the last batches'
    # saves before their epoch's validation) were ranked with the previous
    # validation's val_loss, a score their weights never had; with the name
    # showing it, epoch 1's save (2.0) kept the "1.00" of epoch 0 and ousted
    # epoch 2 (1.5) from the top 2.
    checkpoint = fit(
        tmp_path,
        [1.0, 2.0, 1.5],
        save_top_k=2,
        every_n_train_steps=1,
        every_n_epochs=1,
        filename="{epoch}-{step}-{val_loss:.2f}",
    )
    expected = {
        "epoch=0-step=2-val_loss=1.00.ckpt": (0, 1.0),
        "epoch=2-step=6-val_loss=1.50.ckpt": (2, 1.5),
    }
    assert held(tmp_path) == {**expected, "last.ckpt": (2, 1.5)}
    assert checkpoint.best_k_models == {name: loss for name, (_, loss) in expected.items()}


def test_an_epoch_that_skips_validation_is_not_ranked_by_a_validation_metric(
    tmp_path: Path,
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1)
    trainer = Trainer(
        plugins=[ValLosses([1.0, 9.0, 2.0, 9.0]), checkpoint],
        max_epochs=4,
        check_val_every_n_epoch=2,
        device="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
    )
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(nn.Linear(8, 2), train, val, loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)
    # Epochs 1 and 3 validated; 0 and 2 kept the value of the validation before.
    assert checkpoint.best_k_models == {"epoch=1-step=4.ckpt": 9.0, "epoch=3-step=8.ckpt": 9.0}


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
    ("filename", "expected"),
    [
        (
            None,
            {
                "epoch=0-step=1.ckpt": (0, 1.0),
                "epoch=0-step=2.ckpt": (0, 1.0),
                "epoch=1-step=3.ckpt": (1, 2.0),
                "epoch=1-step=4.ckpt": (1, 2.0),
            },
        ),
        # The epoch end's save formats as "best" too, a version of the name kept.
        (
            "best",
            {
                "best.ckpt": (0, 1.0),
                "best-v1.ckpt": (0, 1.0),
                "best-v2.ckpt": (1, 2.0),
                "best-v3.ckpt": (1, 2.0),
            },
        ),
    ],
)
def test_a_step_saved_again_at_the_epoch_end_replaces_its_own_file(
    tmp_path: Path, filename: str | None, expected: dict[str, tuple[int, float]]
) -> None:
    # Validated at every step, an epoch's last step is saved by the step-wise
    # trigger and again, with the epoch's end done, by the epoch-wise one: the same
    # weights, so the second save takes the first's file instead of a second one.
    checkpoint = fit(
        tmp_path,
        [1.0, 2.0],
        save_top_k=-1,
        every_n_train_steps=1,
        every_n_epochs=1,
        filename=filename,
        val_every_n_steps=1,
    )
    assert held(tmp_path) == {**expected, "last.ckpt": (1, 2.0)}
    assert checkpoint.best_k_models == {name: loss for name, (_, loss) in expected.items()}
    step_4 = max(expected, key=lambda name: read_info(tmp_path / name).record["global_step"])
    assert read_info(tmp_path / step_4).record["epoch_complete"] is True


def test_a_step_saved_again_under_another_name_leaves_one_file(tmp_path: Path) -> None:
    # Ranked by the training loss, an epoch's last step scores its own loss when
    # saved step-wise and the epoch's mean at the epoch's end. The name shows the
    # score, so the two names differ: both were kept, the same weights twice, one
    # of them under a score the ranking no longer gave it.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        monitor="loss",
        save_top_k=-1,
        every_n_train_steps=2,
        every_n_epochs=1,
        filename="{step}-{loss:.6f}",
    )
    epoch_means = []

    class EpochMeans:
        @hookimpl
        def on_train_epoch_end(self, trainer: Trainer) -> None:
            epoch_means.append(trainer.metrics["loss"])

    trainer = Trainer(
        plugins=[checkpoint, EpochMeans()], max_epochs=2, device="cpu", limit_train_batches=2
    )
    train, _ = make_data(n=64, batch_size=16)
    trainer.fit(nn.Linear(8, 2), train, loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)
    names = [
        f"step={step}-loss={mean:.6f}.ckpt" for step, mean in zip((2, 4), epoch_means, strict=True)
    ]
    assert sorted(checkpoint.best_k_models) == names
    assert sorted(path.name for path in tmp_path.glob("step=*.ckpt")) == names


def test_after_a_resume_the_epoch_end_save_replaces_the_same_steps_file(tmp_path: Path) -> None:
    # Ranked by the training loss, step 4 (epoch 1's last) is saved step-wise with
    # its own loss; the run dies before the epoch's end, and the resumed run saves
    # step 4 again at that end, with the epoch's mean loss.
    options: dict[str, Any] = {
        "monitor": "loss",
        "save_top_k": -1,
        "every_n_train_steps": 1,
        "every_n_epochs": 1,
    }
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, [1.0, 2.0], None, CrashBeforeValidation(1), **options)
    assert read_info(tmp_path / "epoch=1-step=4.ckpt").record["epoch_complete"] is False
    checkpoint = fit(tmp_path, [1.0, 2.0], "last", **options)
    state, info = load_file(tmp_path / "epoch=1-step=4.ckpt")
    assert info is not None and info.record["epoch_complete"] is True
    assert checkpoint.best_k_models["epoch=1-step=4.ckpt"] == pytest.approx(
        state["metrics"]["loss"]
    )
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


@pytest.mark.parametrize(
    ("options", "val_every_n_steps", "warned"),
    [
        ({"every_n_train_steps": 2}, None, True),
        ({"every_n_train_steps": 2, "every_n_epochs": 1}, None, False),
        ({"every_n_train_steps": 2}, 2, False),
        ({"every_n_train_steps": 2, "monitor": "loss"}, None, False),
    ],
)
def test_a_fit_whose_saves_can_never_be_ranked_is_warned_when_it_starts(
    tmp_path: Path, options: dict[str, Any], val_every_n_steps: int | None, warned: bool
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = fit(tmp_path, [1.0, 2.0], val_every_n_steps=val_every_n_steps, **options)
    messages = [str(w.message) for w in caught if "hooktrain-checkpoint" in str(w.message)]
    assert bool(messages) is warned
    if warned:
        assert "no checkpoint of this fit will be ranked" in messages[0]
        assert checkpoint.best_k_models == {}
    else:
        assert checkpoint.best_k_models


def test_a_file_whose_eviction_a_crash_cut_short_is_removed_when_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Epoch 1 (1.0) evicts epoch 0 (2.0) once its own files are written; the run
    # dies just then. The checkpoint no longer lists epoch 0's file, so nothing
    # ever removed it: three ranked files stayed with save_top_k=1.
    from hooktrain_checkpoint import sharded

    def dies(path: Path) -> None:
        raise Crash(f"killed before removing {path.name}")

    monkeypatch.setattr(sharded, "remove", dies)
    with pytest.raises(HookError, match=r"killed before removing epoch=0-step=2\.ckpt"):
        fit(tmp_path, [2.0, 1.0, 0.5], save_top_k=1, async_save=False)
    assert (tmp_path / "epoch=0-step=2.ckpt").exists()
    monkeypatch.undo()
    checkpoint = fit(tmp_path, [2.0, 1.0, 0.5], "last", save_top_k=1, async_save=False)
    assert checkpoint.best_k_models == {"epoch=2-step=6.ckpt": 0.5}
    assert held(tmp_path) == {"epoch=2-step=6.ckpt": (2, 0.5), "last.ckpt": (2, 0.5)}


class CrashAtEpochEnd:
    """Raises when epoch 0 ends, before any plugin's save at that end."""

    name = "crash_at_epoch_end"

    @hookimpl(tryfirst=True)
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 0:
            raise Crash


def test_a_resume_ranks_a_save_of_weights_validated_before_the_checkpoint(
    tmp_path: Path,
) -> None:
    # Step 2 is validated (val_every_n_steps) and saved step-wise; the run dies
    # before the epoch's end. Resumed, that end does not validate the same weights
    # again, and the plugin, having forgotten they were validated, left the
    # epoch-end save of step 2 unranked.
    options: dict[str, Any] = {
        "save_top_k": -1,
        "every_n_train_steps": 2,
        "every_n_epochs": 1,
        "val_every_n_steps": 2,
        "filename": "{epoch}-{step}-{loss:.4f}",  # the epoch's mean at its end
    }
    whole = fit(tmp_path / "whole", [1.0, 2.0], **options).best_k_models
    assert sorted(whole.values()) == [1.0, 2.0]
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path / "cut", [1.0, 2.0], None, CrashAtEpochEnd(), **options)
    assert fit(tmp_path / "cut", [1.0, 2.0], "last", **options).best_k_models == whole
    for name in whole:  # each saved again, ranked, with its epoch's end done
        assert read_info(tmp_path / "cut" / name).record["epoch_complete"] is True


@pytest.mark.parametrize(
    ("trainer_options", "why"),
    [
        ({"limit_val_batches": 0}, "limit_val_batches=0 turns validation off"),
        ({"check_val_every_n_epoch": 5}, "validation never runs"),
    ],
)
def test_a_validation_monitor_in_a_fit_that_never_validates_is_warned_with_the_cause(
    tmp_path: Path, trainer_options: dict[str, Any], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was warned at each save as a metric the validation did not compute ("return
    # the loss from validation_step"), blaming a model that was never validated.
    trainer = Trainer(
        plugins=[ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")],
        max_epochs=2,
        device="cpu",
        **trainer_options,
    )
    train, val = make_data(n=64, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            nn.Linear(8, 2),
            train,
            val,
            loss_fn=F.cross_entropy,
            optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
        )
    messages = [str(w.message) for w in caught if "hooktrain-checkpoint" in str(w.message)]
    assert messages[0].startswith(
        f"hooktrain-checkpoint: monitor='val_loss' is a validation metric, but {why}"
    )
    assert "no checkpoint of this fit will be ranked" in messages[0]
    assert "does not exist" not in capsys.readouterr().err  # no second, wrong cause


def test_a_per_loader_metric_names_a_file_with_its_slash_written_as_underscore(
    tmp_path: Path,
) -> None:
    # With two validation loaders every val_ metric has a "/dataloader_idx_N" suffix,
    # which the pattern used to refuse as a directory separator.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        monitor="val_loss/dataloader_idx_1",
        filename="{epoch}-{val_loss/dataloader_idx_1:.3f}",
    )
    trainer = Trainer(
        plugins=[checkpoint], max_epochs=1, seed=0, device="cpu", limit_train_batches=2
    )
    train, val = make_data(n=64, batch_size=16)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    trainer.fit(
        model,
        train,
        [val, val],
        loss_fn=F.cross_entropy,
        optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1),
    )
    score = trainer.metrics["val_loss/dataloader_idx_1"]
    assert (
        checkpoint.best_model_path
        == tmp_path / f"epoch=0-val_loss_dataloader_idx_1={score:.3f}.ckpt"
    )
    assert checkpoint.best_model_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_a_separator_a_format_fills_with_is_written_as_underscore() -> None:
    # "{epoch:/>3}" passed the pattern check and failed at the first save, naming
    # a file in a directory that does not exist.
    assert topk.render_name("{epoch:/>3}", {"epoch": 2}, {}) == "epoch=__2.ckpt"


@pytest.mark.parametrize("pattern", ["a/{epoch}", "{epoch}/b"])
def test_a_directory_separator_outside_the_fields_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="without a directory separator outside its fields"):
        ModelCheckpoint(filename=pattern)
