"""Resuming in-process: exactness after a crash at many points, "last" resolution,
fallback past damaged files, mismatches, plugin-list changes, and the bookkeeping
of top-k and last."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import (
    CheckpointWriteError,
    DamagedCheckpointError,
    ModelCheckpoint,
    read_info,
)
from torch import nn

from hooktrain import ConfigurationError, HookError, Trainer, hookimpl
from hooktrain.testing import HookRecorder, make_data

BATCHES_PER_EPOCH = 8  # make_data(n=128, batch_size=16)


class Net(nn.Module):
    """Dropout, Adam and an epoch-wise LR scheduler: every kind of state there is."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(
                nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 2)
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)]


class Crash(Exception):
    pass


class CrashAt:
    """Raises after the n-th training batch (counted over the whole run)."""

    name = "crash"

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.seen = 0

    @hookimpl
    def on_train_batch_end(self) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise Crash(f"crash after batch {self.seen}")


def fit(
    dirpath: Path,
    *extra: Any,
    ckpt_path: str | None = None,
    epochs: int = 3,
    accumulate: int = 1,
    model: nn.Module | None = None,
    loss_fn: Any = F.cross_entropy,
    **options: Any,
) -> tuple[Trainer, nn.Module, ModelCheckpoint]:
    options.setdefault("every_n_train_steps", 3)
    checkpoint = ModelCheckpoint(dirpath=dirpath, **options)
    trainer = Trainer(
        plugins=[checkpoint, *extra],
        max_epochs=epochs,
        seed=11,
        device="cpu",
        accumulate_grad_batches=accumulate,
    )
    model = model if model is not None else Net()
    train, val = make_data(n=128, batch_size=16, seed=2)
    trainer.fit(model, train, val, loss_fn=loss_fn, ckpt_path=ckpt_path)
    return trainer, model, checkpoint


def assert_identical(a: tuple[Trainer, nn.Module, Any], b: tuple[Trainer, nn.Module, Any]) -> None:
    (trainer_a, model_a, _), (trainer_b, model_b, _) = a, b
    assert trainer_a.global_step == trainer_b.global_step
    for (name, x), (_, y) in zip(
        model_a.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), f"model {name} differs"
    state_a = trainer_a.optimizers[0].state_dict()
    state_b = trainer_b.optimizers[0].state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for index, per_param in state_a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, state_b["state"][index][key]), f"optimizer {key} differs"
    assert trainer_a.lr_schedulers[0].state_dict() == trainer_b.lr_schedulers[0].state_dict()


_references: dict[int, tuple[Trainer, nn.Module, Any]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, accumulate: int) -> Any:
    if accumulate not in _references:
        _references[accumulate] = fit(tmp_path_factory.mktemp("ref"), accumulate=accumulate)
    return _references[accumulate]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("crash_after", [1, 4, 7, 8, 9, 13, 16, 23])
def test_crash_anywhere_then_resume_last_is_bit_identical(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, crash_after: int, accumulate: int
) -> None:
    # Crash points cover: before any checkpoint, mid-epoch, inside an accumulation
    # window, the epoch's last batch (8, 16) and the first batch of an epoch.
    expected = reference(tmp_path_factory, accumulate)
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(crash_after), accumulate=accumulate)
    resumed = fit(tmp_path, ckpt_path="last", accumulate=accumulate)
    assert_identical(expected, resumed)


@pytest.mark.parametrize("crash_after", [13, 23, 33, 34])
def test_a_checkpoint_at_a_log_point_resumes_the_epochs_means_bit_identically(
    tmp_path: Path, crash_after: int
) -> None:
    # Saved every 10 steps, published every 10: the save at a log point kept the
    # losses since the last one unsummed, and the resumed run summed them with the
    # next ones, in other groups than the run never interrupted: its epoch loss
    # differed in the last bits.
    def run(directory: Path, *extra: Any, ckpt_path: str | None = None) -> Trainer:
        checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=10)
        trainer = Trainer(
            plugins=[checkpoint, *extra], max_epochs=1, seed=3, device="cpu", log_every_n_steps=10
        )
        train, val = make_data(n=640, batch_size=16, seed=5)  # 40 steps
        trainer.fit(Net(), train, val, loss_fn=F.cross_entropy, ckpt_path=ckpt_path)
        return trainer

    expected = run(tmp_path / "reference").metrics.floats()
    with pytest.raises(HookError, match="Crash"):
        run(tmp_path / "run", CrashAt(crash_after))
    assert run(tmp_path / "run", ckpt_path="last").metrics.floats() == expected


@pytest.mark.parametrize("crash_after", [7, 13])
def test_a_large_state_written_from_a_snapshot_resumes_bit_identically(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    crash_after: int,
) -> None:
    # Small states are encoded on the training thread; above the limit the writer
    # thread encodes a snapshot. Both must resume the same run.
    from hooktrain_checkpoint import storage

    expected = reference(tmp_path_factory, 1)
    monkeypatch.setattr(storage, "INLINE_ENCODE_LIMIT", 0)
    encoded_here: list[int] = []
    real_encode = storage.encode
    monkeypatch.setattr(storage, "encode", lambda *a: encoded_here.append(1) or real_encode(*a))
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(crash_after))
    resumed = fit(tmp_path, ckpt_path="last")
    assert encoded_here == []
    assert resumed[2].write_costs  # it did write
    assert_identical(expected, resumed)


def test_a_small_state_is_encoded_on_the_training_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from hooktrain_checkpoint import storage

    threads: list[str] = []
    real_encode = storage.encode

    def spy(*args: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real_encode(*args)

    monkeypatch.setattr(storage, "encode", spy)
    _, _, checkpoint = fit(tmp_path, epochs=1)
    assert threads and set(threads) == {threading.main_thread().name}
    assert len(threads) == len(checkpoint.write_costs)


def test_resume_retrains_no_batch_and_skips_none(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(11), every_n_train_steps=2)  # last save at step 10
    recorder = HookRecorder(hooks=["on_train_batch_start"])
    fit(tmp_path, recorder, ckpt_path="last", every_n_train_steps=2)
    indices = [call.kwargs["batch_idx"] for call in recorder.of("on_train_batch_start")]
    # Epoch 1 resumes after its second batch (steps 9 and 10 were done).
    assert indices == list(range(2, 8)) + list(range(8))


def test_skipped_batches_are_not_loaded(tmp_path: Path) -> None:
    loaded: list[int] = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, base: Any) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, index: int) -> Any:
            loaded.append(index)
            return self.base[index]

    def run(*extra: Any, ckpt_path: str | None = None) -> None:
        train, _ = make_data(n=128, batch_size=16, seed=2)
        loader = torch.utils.data.DataLoader(Counting(train.dataset), batch_size=16, shuffle=True)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5)
        trainer = Trainer(plugins=[checkpoint, *extra], max_epochs=1, seed=1, device="cpu")
        trainer.fit(Net(), loader, loss_fn=F.cross_entropy, ckpt_path=ckpt_path)

    with pytest.raises(HookError, match="Crash"):
        run(CrashAt(6))
    loaded.clear()
    run(ckpt_path="last")
    assert len(loaded) == 3 * 16  # batches 5, 6, 7 only


def test_last_with_an_empty_directory_starts_fresh_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer, _, _ = fit(tmp_path / "none-yet", ckpt_path="last", epochs=1)
    assert trainer.global_step == BATCHES_PER_EPOCH
    assert "starting fresh" in capsys.readouterr().err


def test_a_fresh_fit_over_an_earlier_runs_checkpoints_warns(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty directory: nothing to say
        fit(tmp_path, epochs=1)
    with pytest.warns(
        UserWarning, match=r"holds \d+ checkpoint\(s\) already \(newest: last\.ckpt\)"
    ):
        fit(tmp_path, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # continuing it replaces nothing of another run
        fit(tmp_path, ckpt_path="last", epochs=2)


def test_last_resumes_the_run_saved_most_recently_not_the_one_trained_furthest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier run trained further and left ranked files the new run never evicts;
    # its progress is larger, but "last" means the newer run (as the warning says).
    fit(tmp_path, epochs=3, save_top_k=-1)
    with pytest.warns(UserWarning, match="already"):
        fit(tmp_path, epochs=1)
    assert (tmp_path / "epoch=2-step=24.ckpt").exists()
    capsys.readouterr()
    resumed, _, _ = fit(tmp_path, ckpt_path="last", epochs=2)
    err = capsys.readouterr().err
    assert "(epoch 0, global step 8)" in err, err
    assert resumed.global_step == 2 * BATCHES_PER_EPOCH


def test_last_after_a_resume_from_an_older_file_continues_that_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Resumed from an older file, the run's saves have less progress than the files
    # it branched from; "last" must still find them (by save number, not a clock,
    # which may be set back on the node a resume runs on).
    fit(tmp_path, epochs=3, save_top_k=-1)
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(4), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"), save_top_k=-1)
    capsys.readouterr()
    fit(tmp_path, ckpt_path="last", epochs=1, save_top_k=-1)
    assert "(epoch 0, global step 6)" in capsys.readouterr().err


def test_one_plugin_object_for_two_fresh_fits_saves_the_second_fits_state(
    tmp_path: Path,
) -> None:
    # The second fit ends at the progress the first one's last save had: its final
    # state used to be taken as saved already, and its ranking to start from the
    # first fit's files, so last.ckpt and the ranked files kept the first fit's weights.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)
    for seed in (1, 2):
        trainer = Trainer(plugins=[checkpoint], max_epochs=2, seed=seed, device="cpu")
        model = Net()
        train, val = make_data(n=128, batch_size=16, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the second fit is warned it starts over
            trainer.fit(model, train, val, loss_fn=F.cross_entropy)
    weight = model.state_dict()["body.0.weight"]
    for name in ("last.ckpt", "epoch=1-step=16.ckpt"):
        saved = torch.load(tmp_path / name, weights_only=True)["model"]["body.0.weight"]
        assert torch.equal(saved, weight), name


def test_rerunning_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    first = fit(tmp_path, epochs=2, every_n_train_steps=5)  # ends between saves
    recorder = HookRecorder(hooks=["on_train_batch_start"])
    again = fit(tmp_path, recorder, ckpt_path="last", epochs=2, every_n_train_steps=5)
    assert recorder.count("on_train_batch_start") == 0
    assert_identical(first, again)
    # Progress is where the finished run left it, and last.ckpt is not rewritten.
    assert again[0].current_epoch == first[0].current_epoch == 1
    assert again[0].epoch_complete
    assert again[2].write_costs == []
    assert read_info(tmp_path / "last.ckpt").record["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_is_reported_and_last_falls_back(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(10), save_top_k=-1)
    newest = [tmp_path / "last.ckpt", tmp_path / "epoch=1-step=9.ckpt"]
    for path in newest:
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x01
        path.unlink()  # last.ckpt is a hard link: damage each name separately
        path.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = fit(tmp_path, ckpt_path="last", save_top_k=-1)
    err = capsys.readouterr().err
    for path in newest:
        assert f"skipping {str(path)!r}, damaged: " in err
    assert "resuming from" in err and "epoch=0-step=6.ckpt" in err
    assert_identical(reference(tmp_path_factory, 1), resumed)


def test_ctrl_c_says_where_the_run_can_continue_from(tmp_path: Path) -> None:
    class CtrlC:
        @hookimpl
        def on_train_batch_end(self, trainer: Trainer) -> None:
            if trainer.global_step == 7:  # after the save of step 6
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        fit(tmp_path, CtrlC(), async_save=False)
    assert info.value.__notes__[-1] == (
        f"hooktrain-checkpoint: the last checkpoint saved is {tmp_path / 'last.ckpt'}; "
        f"run again with ckpt_path='last' to continue from it"
    )


def test_explicit_damaged_file_fails_naming_it(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)
    path = tmp_path / "last.ckpt"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:-100])
    # A file the user named is not stepped around: it is an error, naming it.
    with pytest.raises(HookError, match=r"last\.ckpt' is damaged") as info:
        fit(tmp_path, ckpt_path=str(path), epochs=2)
    assert isinstance(info.value.__cause__, DamagedCheckpointError)


def test_a_different_model_fails_listing_the_mismatches(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)
    with pytest.raises(ConfigurationError) as info:
        fit(tmp_path, ckpt_path="last", epochs=2, model=Net(hidden=12))
    message = str(info.value)
    assert "body.0.weight: checkpoint (16, 8) vs model (12, 8)" in message
    assert "last.ckpt" in "".join(getattr(info.value, "__notes__", []))

    class Other(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ConfigurationError, match=r"missing from the checkpoint: extra\.bias"):
        fit(tmp_path, ckpt_path="last", epochs=2, model=Other())


class Stateful:
    """A plugin with state of its own, stored through the core's hooks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.restored: Any = None

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"][self.name] = {"step": trainer.global_step}

    @hookimpl
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restored = checkpoint["plugins"].get(self.name)


def test_a_different_plugin_list_restores_what_matches_and_says_what_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Stateless:
        name = "stateless"

        @hookimpl
        def on_fit_start(self, trainer: Trainer) -> None:
            pass

    fit(tmp_path, Stateful("kept"), Stateful("dropped"), epochs=1)
    kept, added = Stateful("kept"), Stateful("added")
    capsys.readouterr()
    fit(tmp_path, kept, added, Stateless(), ckpt_path="last", epochs=2)
    err = capsys.readouterr().err
    assert kept.restored == {"step": BATCHES_PER_EPOCH}
    assert added.restored is None
    assert "not restored: dropped" in err
    # A plugin with nothing to load (as compile) is not said to lack its state.
    assert "without saved state: added\n" in err


class Scores:
    """Logs a chosen score at every epoch end, before the checkpoint plugin looks."""

    name = "scores"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        trainer.log("score", self.values[trainer.current_epoch])


def fit_scores(
    tmp_path: Path, values: list[float], epochs: int, ckpt_path: str | None = None, **options: Any
) -> ModelCheckpoint:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        monitor="score",
        every_n_epochs=1,
        filename="{epoch}-{score:.1f}",
        **options,
    )
    trainer = Trainer(
        plugins=[Scores(values), checkpoint],
        max_epochs=epochs,
        seed=0,
        device="cpu",
        limit_train_batches=2,
    )
    train, _ = make_data(n=64, batch_size=16)
    trainer.fit(Net(), train, loss_fn=F.cross_entropy, ckpt_path=ckpt_path)
    return checkpoint


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize(
    ("mode", "kept", "best"),
    [
        ("min", {"epoch=3-score=1.0.ckpt", "epoch=4-score=2.0.ckpt"}, "epoch=3-score=1.0.ckpt"),
        ("max", {"epoch=0-score=5.0.ckpt", "epoch=2-score=4.0.ckpt"}, "epoch=0-score=5.0.ckpt"),
    ],
)
def test_top_k_keeps_the_best_and_last_the_newest(
    tmp_path: Path, mode: str, kept: set[str], best: str
) -> None:
    checkpoint = fit_scores(tmp_path, [5, 3, 4, 1, 2], 5, mode=mode, save_top_k=2)
    assert names(tmp_path) == kept | {"last.ckpt"}
    assert checkpoint.best_model_path == tmp_path / best
    assert read_info(tmp_path / "last.ckpt").record["epoch"] == 4
    assert set(checkpoint.best_k_models) == kept


def test_top_k_bookkeeping_survives_a_resume(tmp_path: Path) -> None:
    fit_scores(tmp_path, [5, 3, 4, 1, 2], 3, save_top_k=2)
    assert names(tmp_path) == {"epoch=1-score=3.0.ckpt", "epoch=2-score=4.0.ckpt", "last.ckpt"}
    checkpoint = fit_scores(tmp_path, [5, 3, 4, 1, 2], 5, ckpt_path="last", save_top_k=2)
    # Without the restored ranking, epoch 4 (2.0) could not have evicted epoch 1 (3.0).
    assert names(tmp_path) == {"epoch=3-score=1.0.ckpt", "epoch=4-score=2.0.ckpt", "last.ckpt"}
    assert checkpoint.best_k_models == {
        "epoch=3-score=1.0.ckpt": 1.0,
        "epoch=4-score=2.0.ckpt": 2.0,
    }


def test_a_resume_ranking_by_another_mode_says_so_and_keeps_the_old_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit_scores(tmp_path, [5, 3, 4, 1, 2], 3, save_top_k=2)
    old = {"epoch=1-score=3.0.ckpt", "epoch=2-score=4.0.ckpt"}
    capsys.readouterr()
    checkpoint = fit_scores(
        tmp_path, [5, 3, 4, 1, 2], 5, ckpt_path="last", save_top_k=2, mode="max"
    )
    err = capsys.readouterr().err
    assert "the checkpoint ranked by 'score' (min), this run by 'score' (max)" in err
    assert "the 2 file(s) it kept (epoch=1-score=3.0.ckpt, epoch=2-score=4.0.ckpt)" in err
    # Scores of another order are not compared with this run's: the old files stay,
    # and only this run's saves (epochs 3 and 4) are ranked.
    assert checkpoint.best_k_models == {
        "epoch=3-score=1.0.ckpt": 1.0,
        "epoch=4-score=2.0.ckpt": 2.0,
    }
    assert names(tmp_path) == old | set(checkpoint.best_k_models) | {"last.ckpt"}


def test_save_top_k_zero_keeps_only_last_and_save_last_false_keeps_no_last(
    tmp_path: Path,
) -> None:
    fit_scores(tmp_path / "a", [5, 3, 4], 3, save_top_k=0)
    assert names(tmp_path / "a") == {"last.ckpt"}
    fit_scores(tmp_path / "b", [5, 3, 4], 3, save_top_k=1, save_last=False)
    assert names(tmp_path / "b") == {"epoch=1-score=3.0.ckpt"}


def test_without_monitor_top_k_keeps_the_newest(tmp_path: Path) -> None:
    fit(tmp_path, epochs=2, save_top_k=2, every_n_train_steps=4)
    assert names(tmp_path) == {"epoch=1-step=12.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"}


@pytest.mark.parametrize(
    ("monitor", "loaders", "hint"),
    [
        ("val_los", 1, "Did you mean 'val_loss'?"),
        # Several validation loaders: the per-loader name, not 'loss' (closer by spelling).
        ("val_loss", 2, "Did you mean 'val_loss/dataloader_idx_0'?"),
    ],
)
def test_a_missing_monitor_warns_once_naming_a_close_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monitor: str, loaders: int, hint: str
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=monitor)
    trainer = Trainer(plugins=[checkpoint], max_epochs=2, device="cpu", limit_train_batches=2)
    train, val = make_data(n=64, batch_size=16)
    trainer.fit(Net(), train, [val] * loaders, loss_fn=F.cross_entropy)
    err = capsys.readouterr().err
    assert err.count(f"monitored metric {monitor!r} does not exist") == 1
    assert hint in err
    assert names(tmp_path) == {"last.ckpt"}


def test_a_monitor_that_a_silent_validation_never_computes_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class LogsNothing(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])  # Lightning's habit: self.log, and return nothing

    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = Trainer(plugins=[checkpoint], max_epochs=2, device="cpu", limit_train_batches=2)
    train, val = make_data(n=64, batch_size=16)
    with pytest.warns(UserWarning, match="validation in fit computed no metric"):
        trainer.fit(LogsNothing(), train, val, loss_fn=F.cross_entropy)
    err = capsys.readouterr().err
    # Not a word before: no val_ metric existed, which read as "not validated yet".
    assert err.count("monitored metric 'val_loss' does not exist at epoch 0") == 1
    assert "Validation ran and computed no metric" in err
    assert checkpoint.best_model_path is None


def test_a_failed_background_write_surfaces(tmp_path: Path) -> None:
    class BreakDirectory:
        """Replaces the checkpoint directory by a file right after the first save."""

        @hookimpl
        def on_train_batch_end(self, trainer: Trainer) -> None:
            if trainer.global_step == 3:
                checkpoint.wait()
                for path in target.iterdir():
                    path.unlink()
                target.rmdir()
                target.write_text("not a directory")

    target = tmp_path / "ckpts"
    checkpoint = ModelCheckpoint(dirpath=target, every_n_train_steps=3)
    trainer = Trainer(plugins=[checkpoint, BreakDirectory()], max_epochs=1, device="cpu")
    train, _ = make_data(n=128, batch_size=16)
    with pytest.raises(HookError) as info:
        trainer.fit(Net(), train, loss_fn=F.cross_entropy)
    assert isinstance(info.value.__cause__, CheckpointWriteError)
    assert "ckpts" in str(info.value)


def test_sigterm_handler_is_restored_after_fit(tmp_path: Path) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    fit(tmp_path, epochs=1)
    assert signal.getsignal(signal.SIGTERM) is before


def sigterm_at_step(step: int) -> Any:
    """A loss function that sends this process SIGTERM while computing the loss of
    the ``step``-th batch: a signal in the middle of a step, with no plugin hook per
    step (the core's own batch loop stays in use)."""
    calls = 0

    def loss_fn(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(predicted, targets)

    return loss_fn


EPOCH_WISE = {"every_n_train_steps": None, "every_n_epochs": 1}


@pytest.mark.parametrize("step", [5, BATCHES_PER_EPOCH])
def test_sigterm_stops_after_the_step_saves_and_resumes_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, step: int, capsys: Any
) -> None:
    expected = fit(tmp_path_factory.mktemp("ref"), **EPOCH_WISE)
    trainer, _, checkpoint = fit(tmp_path, loss_fn=sigterm_at_step(step), **EPOCH_WISE)
    assert trainer.should_stop and checkpoint.interrupted
    assert trainer.global_step == step and trainer.current_epoch == 0
    assert "SIGTERM received; saved" in capsys.readouterr().err
    record = read_info(tmp_path / "last.ckpt").record
    assert record["global_step"] == step
    # At the epoch's last batch the epoch still ends, and its due save happens.
    at_epoch_end = step == BATCHES_PER_EPOCH
    assert record["epoch_complete"] is at_epoch_end
    assert (tmp_path / f"epoch=0-step={step}.ckpt").exists() is at_epoch_end
    resumed = fit(tmp_path, ckpt_path="last", **EPOCH_WISE)
    assert not resumed[2].interrupted
    assert_identical(expected, resumed)


def test_a_sigterm_at_the_runs_last_step_lets_it_finish_and_not_report_an_interruption(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: Any
) -> None:
    # The epoch ends at its last batch whatever the signal, so the run was done; it
    # was reported interrupted, and a script exiting 143 on that had a scheduler
    # requeue a finished job.
    expected = fit(tmp_path_factory.mktemp("ref"), epochs=1, **EPOCH_WISE)
    stopped = fit(tmp_path, epochs=1, loss_fn=sigterm_at_step(BATCHES_PER_EPOCH), **EPOCH_WISE)
    trainer, _, checkpoint = stopped
    assert trainer.finished
    assert not trainer.interrupted and not checkpoint.interrupted
    err = capsys.readouterr().err
    assert "SIGTERM received at the run's last step; the run finished" in err
    assert "Run the same command" not in err
    assert read_info(tmp_path / "last.ckpt").record["epoch_complete"] is True
    assert_identical(expected, stopped)
    rerun = fit(tmp_path, ckpt_path="last", epochs=1)
    assert rerun[0].global_step == trainer.global_step  # nothing left to train


@pytest.mark.parametrize("stop", ["sigterm", "max_steps"])
def test_a_resume_stopped_before_its_first_batch_keeps_its_checkpoint(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, stop: str, capsys: Any
) -> None:
    # A SIGTERM while a resume starts (a preemption during its setup), or a finished
    # max_steps run rerun, saved "0 batches of the epoch done" over the mid-epoch
    # last.ckpt: the next resume trained the epoch's first batches twice.
    expected = reference(tmp_path_factory, 1)
    with pytest.raises(HookError, match="Crash"):
        fit(tmp_path, CrashAt(13))  # saved at step 12, mid-epoch 1
    if stop == "sigterm":
        early = ("faults", {"hook": "on_fit_start", "step": 12, "fault": "sigterm"})
        trainer, _, checkpoint = fit(tmp_path, early, ckpt_path="last")
        assert checkpoint.interrupted
        assert "SIGTERM received; nothing trained since the resume (epoch 1, global step 12)" in (
            capsys.readouterr().err
        )
    else:
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)
        trainer = Trainer(plugins=[checkpoint], max_epochs=3, max_steps=12, seed=11, device="cpu")
        train, val = make_data(n=128, batch_size=16, seed=2)
        trainer.fit(Net(), train, val, loss_fn=F.cross_entropy, ckpt_path="last")
    assert trainer.global_step == 12
    record = read_info(tmp_path / "last.ckpt").record
    assert (record["global_step"], record["epoch_batches_done"]) == (12, 4)
    assert_identical(expected, fit(tmp_path, ckpt_path="last"))


class PretendTwoProcesses:
    """world_size 2 in one process: all_reduce of one process is the identity, so the
    agreement code runs for real and the sums are this process's values."""

    name = "two"

    def __init__(self) -> None:
        self.reductions = 0

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.world_size = 2

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reductions += 1
        return tensor

    @hookimpl
    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj, obj]  # the other process logged the same names


class SigtermAfterEpochEnd:
    """Sends SIGTERM in its on_train_epoch_end of the first epoch (after the
    checkpoint plugin's, which comes first in the list) and notes what the handler
    did to ``should_stop`` there."""

    name = "sigterm_after_epoch_end"

    def __init__(self) -> None:
        self.should_stop_after_signal: bool | None = None

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.should_stop_after_signal is None:
            os.kill(os.getpid(), signal.SIGTERM)
            self.should_stop_after_signal = trainer.should_stop


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_between_epochs_stops_every_process_on_the_same_path(
    tmp_path: Path, processes: int
) -> None:
    # After an epoch's end the core reads should_stop without agreeing on it, so
    # with several processes the handler must not set it there on one alone (that
    # one would stop, the others wait in the next collective). The flag is agreed
    # on at the next epoch's start instead, and all stop after its first step.
    signaller = SigtermAfterEpochEnd()
    extra: list[Any] = [signaller] + ([PretendTwoProcesses()] if processes > 1 else [])
    trainer, _, checkpoint = fit(tmp_path, *extra, **EPOCH_WISE)
    assert signaller.should_stop_after_signal is (processes == 1)
    assert trainer.should_stop and checkpoint.interrupted
    stopped_at = BATCHES_PER_EPOCH if processes == 1 else BATCHES_PER_EPOCH + 1
    assert trainer.global_step == stopped_at
    record = read_info(tmp_path / "last.ckpt").record
    assert record["global_step"] == stopped_at
    assert record["epoch_complete"] is (processes == 1)


def test_several_processes_agree_on_sigterm_per_epoch_not_per_step(tmp_path: Path) -> None:
    two = PretendTwoProcesses()
    trainer, _, _ = fit(tmp_path, two, epochs=2, **EPOCH_WISE)
    # The core agrees on should_stop once per optimizer step; the plugin adds one
    # agreement at each epoch's start and end and one at fit end, not one per step.
    steps, epochs = trainer.global_step, 2
    epoch_means = two.reductions - steps - 2 * epochs - 1
    assert 0 <= epoch_means < steps


def test_the_last_write_ends_even_when_an_earlier_teardown_raises(tmp_path: Path) -> None:
    import signal

    class FailingTeardown:
        name = "failing_teardown"

        @hookimpl
        def teardown(self) -> None:
            raise RuntimeError("teardown failed")

    before = signal.getsignal(signal.SIGTERM)
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    # Listed first, its teardown is called first; the checkpoint's still runs and
    # waits for the last write, which is complete when fit returns (here, raises).
    trainer = Trainer(plugins=[FailingTeardown(), checkpoint], max_epochs=2, device="cpu")
    train, _ = make_data(n=64, batch_size=16)
    with pytest.raises(HookError, match="teardown failed"):
        trainer.fit(Net(), train, loss_fn=F.cross_entropy)
    assert not checkpoint._writer.busy and checkpoint._writer._thread is None
    assert signal.getsignal(signal.SIGTERM) is before
    assert read_info(tmp_path / "last.ckpt").record["global_step"] == 8


def test_filename_pattern_fills_epoch_step_and_metrics(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="run-{epoch:03d}-{step}-{val_loss:.2f}")
    trainer = Trainer(plugins=[checkpoint], device="cpu")
    trainer.current_epoch, trainer.global_step = 2, 40
    assert checkpoint.format_name(trainer) == "run-epoch=002-step=40-val_loss=none.ckpt"
    trainer.log("val_loss", 0.12345)
    assert checkpoint.format_name(trainer) == "run-epoch=002-step=40-val_loss=0.12.ckpt"


@pytest.mark.parametrize(
    "options",
    [{"mode": "mean"}, {"save_top_k": -2}, {"every_n_train_steps": 0}, {"filename": "a/b"}],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="checkpoint"):
        ModelCheckpoint(**options)


def test_selected_by_entry_point_name(tmp_path: Path) -> None:
    trainer = Trainer(plugins=[("checkpoint", {"dirpath": os.fspath(tmp_path)})], device="cpu")
    assert trainer.plugin_names == ["checkpoint"]
