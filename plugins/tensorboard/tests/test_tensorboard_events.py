"""The event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hooktrain_tensorboard import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from hooktrain import Trainer, hookimpl
from hooktrain.plugins import installed_plugins
from hooktrain.testing import make_data, make_model, run

# 128 samples in batches of 16: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8
#: What a run records of its hyperparameters: the start and end of its session.
HPARAMS_TAGS = {"_hparams_/session_start_info", "_hparams_/session_end_info"}


def read(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def test_scalars_of_every_scope_and_learning_rate(tmp_path: Path) -> None:
    result = run(
        [("tensorboard", {"log_dir": tmp_path / "runs", "name": "exp"})],
        max_epochs=2,
        log_every_n_steps=2,
    )
    run_dir = tmp_path / "runs" / "exp" / "version_0"
    assert sorted(os.listdir(tmp_path / "runs" / "exp")) == ["version_0"]
    events = read(run_dir)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "epoch/loss", "epoch/acc", "val/loss", "val/acc", "lr/group_0"} <= scalars

    assert steps(events, "train/loss") == [2, 4, 6, 8, 10, 12, 14, 16]
    assert steps(events, "epoch/loss") == [8, 16]
    assert steps(events, "val/acc") == [8, 16]
    # The learning rate is written with the training values, once per step.
    assert steps(events, "lr/group_0") == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [event.value for event in events.Scalars("lr/group_0")] == pytest.approx([0.1] * 8)

    # What was written is what the trainer computed.
    trainer = result.trainer
    assert events.Scalars("val/acc")[-1].value == pytest.approx(trainer.metrics["val_acc"])
    assert events.Scalars("epoch/loss")[-1].value == pytest.approx(trainer.metrics["loss"])


def test_hyperparameters_land_in_the_same_run(tmp_path: Path) -> None:
    run(
        [("tensorboard", {"log_dir": tmp_path, "hparams": {"lr": 0.1, "arch": [8, 16]}})],
        max_epochs=1,
        seed=7,
    )
    events = read(tmp_path / "default" / "version_0")
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = data.session_start_info.hparams
    assert hparams["max_epochs"].number_value == 1
    assert hparams["seed"].number_value == 7
    assert hparams["plugins"].string_value == "tensorboard, recorder"
    assert hparams["max_steps"].string_value == "None"
    assert hparams["lr"].number_value == pytest.approx(0.1)
    assert hparams["arch"].string_value == "8, 16"


def test_direct_object_thins_out_training_values(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", log_every_n_steps=4, log_lr=False)
    run([logger], max_epochs=2, log_every_n_steps=2)
    assert logger.run_dir == tmp_path / "version_0"
    events = read(logger.run_dir)
    assert steps(events, "train/loss") == [4, 8, 12, 16]
    assert not any(tag.startswith("lr/") for tag in events.Tags()["scalars"])
    # Epoch and validation values are never thinned out.
    assert steps(events, "val/loss") == [8, 16]


def test_each_fresh_run_gets_the_next_version(tmp_path: Path) -> None:
    (tmp_path / "default" / "version_4").mkdir(parents=True)
    (tmp_path / "default" / "notes").mkdir()
    for _ in range(2):
        run([("tensorboard", {"log_dir": tmp_path})], max_epochs=1, record=False)
    assert sorted(os.listdir(tmp_path / "default")) == [
        "notes",
        "version_4",
        "version_5",
        "version_6",
    ]
    assert steps(read(tmp_path / "default" / "version_6"), "epoch/loss") == [8]


class Published:
    """Keeps the training loss of every publication, as the trainer published it."""

    name = "published"

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    @hookimpl
    def log_metrics(self, metrics: dict[str, float], step: int, scope: str) -> None:
        if scope == "step":
            self.losses.append((step, metrics["loss"]))


def test_a_second_fit_writes_a_new_version_and_keeps_the_first(tmp_path: Path) -> None:
    published = Published()
    trainer = Trainer(
        plugins=[("tensorboard", {"log_dir": tmp_path, "name": ""}), published],
        max_epochs=1,
        log_every_n_steps=1,
        device="cpu",
    )
    model = make_model()
    one_batch, _ = make_data(n=16, batch_size=16)
    for _ in range(2):
        trainer.fit(
            model,
            one_batch,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
    # Each fit counts its steps from 0: both published a loss at step 1, and
    # TensorBoard shows both.
    assert [step for step, _ in published.losses] == [1, 1]
    shown = [
        (version, event.step)
        for version in sorted(os.listdir(tmp_path))
        for event in read(tmp_path / version).Scalars("train/loss")
    ]
    assert shown == [("version_0", 1), ("version_1", 1)]
    for version, (step, loss) in zip(["version_0", "version_1"], published.losses, strict=True):
        events = read(tmp_path / version)
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
            (step, pytest.approx(loss))
        ]
        assert steps(events, "lr/group_0") == [1]
        assert set(events.PluginTagToContent("hparams")) == HPARAMS_TAGS


def test_with_a_fixed_version_tensorboard_shows_the_latest_fit(tmp_path: Path) -> None:
    published = Published()
    trainer = Trainer(
        plugins=[("tensorboard", {"log_dir": tmp_path, "name": "", "version": 0}), published],
        max_epochs=1,
        log_every_n_steps=1,
        device="cpu",
    )
    model = make_model()
    one_batch, _ = make_data(n=16, batch_size=16)
    for _ in range(2):
        trainer.fit(
            model,
            one_batch,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
    assert os.listdir(tmp_path) == ["version_0"]
    (_, second_loss) = published.losses[1]
    events = read(tmp_path / "version_0")
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, pytest.approx(second_loss))
    ]


def test_a_resumed_fit_goes_back_to_the_checkpoints_version(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="")
    trainer = Trainer(plugins=[logger], max_epochs=1, log_every_n_steps=1, device="cpu")
    model = make_model()
    train, _ = make_data()

    def fit(**kwargs: object) -> None:
        trainer.fit(
            model,
            train,
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            **kwargs,
        )

    fit()
    ckpt = tmp_path / "after_fit_1.ckpt"
    torch.save(trainer.dump_checkpoint(), ckpt)
    fit()
    assert logger.run_dir == tmp_path / "version_1"
    trainer.max_epochs = 2
    fit(ckpt_path=ckpt)
    assert logger.run_dir == tmp_path / "version_0"
    assert sorted(os.listdir(tmp_path)) == ["after_fit_1.ckpt", "version_0", "version_1"]
    assert steps(read(tmp_path / "version_0"), "train/loss") == list(range(1, 17))
    assert steps(read(tmp_path / "version_1"), "train/loss") == list(range(1, 9))


def test_learning_rate_of_every_param_group(tmp_path: Path) -> None:
    model = make_model()
    train, val = make_data()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters()}], lr=0.25
    )
    trainer = Trainer(
        plugins=[("tensorboard", {"log_dir": tmp_path})],
        max_epochs=1,
        log_every_n_steps=4,
        device="cpu",
    )
    trainer.fit(model, train, val, loss_fn=F.cross_entropy, optimizer=optimizer)
    events = read(tmp_path / "default" / "version_0")
    assert [e.value for e in events.Scalars("lr/group_0")] == [0.5, 0.5]
    assert [e.value for e in events.Scalars("lr/group_1")] == [0.25, 0.25]


class ScheduledModel(torch.nn.Module):
    """A model whose LR scheduler steps per step (factor 1/(k+1)) or per epoch (x0.1)."""

    def __init__(self, interval: str) -> None:
        super().__init__()
        self.net = make_model()
        self.interval = interval

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.interval == "step":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 / (k + 1))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.interval},
        }


@pytest.mark.parametrize(
    ("interval", "batches", "every", "expected"),
    [
        ("step", 1, 1, {1: 1.0, 2: 0.5}),
        # Written at the epoch ends (steps 2 and 4): step 2 trained with 1.0, even
        # though the scheduler moved the rate to 0.1 before the epoch's values went out.
        ("epoch", 2, 4, {2: 1.0, 4: 0.1}),
    ],
)
def test_the_learning_rate_written_for_a_step_is_the_one_it_trained_with(
    tmp_path: Path, interval: str, batches: int, every: int, expected: dict[int, float]
) -> None:
    train, _ = make_data(n=16 * batches, batch_size=16)
    trainer = Trainer(
        plugins=[("tensorboard", {"log_dir": tmp_path, "name": ""})],
        max_epochs=2,
        log_every_n_steps=every,
        device="cpu",
    )
    trainer.fit(ScheduledModel(interval), train, loss_fn=F.cross_entropy)
    events = read(tmp_path / "version_0")
    written = {e.step: e.value for e in events.Scalars("lr/group_0")}
    assert written == pytest.approx(expected)


class _ShorterThanItsLen:
    """Yields the batches of ``loader`` but says it has one more."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader) + 1


def test_the_epoch_learning_rate_is_written_when_the_loader_ends_early(tmp_path: Path) -> None:
    # The rates are read before a step that publishes or an epoch's last batch by
    # its len; a loader that ends before that batch still gets its epoch's rate.
    train, _ = make_data(n=48, batch_size=16)
    trainer = Trainer(
        plugins=[("tensorboard", {"log_dir": tmp_path, "name": ""})],
        max_epochs=1,
        log_every_n_steps=50,
        device="cpu",
    )
    with pytest.warns(UserWarning, match="said it has 4 batches"):
        trainer.fit(
            make_model(),
            _ShorterThanItsLen(train),
            loss_fn=F.cross_entropy,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.25),
        )
    events = read(tmp_path / "version_0")
    assert {e.step: e.value for e in events.Scalars("lr/group_0")} == {3: 0.25}


def test_standalone_validate_and_test_write_to_the_fit_run(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    result = run([logger], max_epochs=1)
    model, (_, val) = result.model, make_data()
    result.trainer.test(model, val, loss_fn=F.cross_entropy)
    assert sorted(os.listdir(tmp_path / "default")) == ["version_0"]
    events = read(tmp_path / "default" / "version_0")
    assert steps(events, "test/loss") == [STEPS_PER_EPOCH]
    # The test stage reopened the folder without a restart marker: the fit's values
    # at the same step survive.
    assert steps(events, "val/loss") == [STEPS_PER_EPOCH]


class SaveAfterEpoch:
    """Writes a plain core checkpoint at the end of one epoch."""

    name = "saver"

    def __init__(self, path: Path, epoch: int) -> None:
        self.path, self.epoch = path, epoch

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == self.epoch:
            torch.save(trainer.dump_checkpoint(), self.path)


class CrashAt:
    """Raises in the middle of an epoch, after the step's values were written."""

    name = "crash"

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    @hookimpl
    def log_metrics(self, trainer: Trainer, scope: str) -> None:
        if (
            scope == "step"
            and trainer.current_epoch == self.epoch
            and trainer.epoch_batches_done == self.batch
        ):
            raise RuntimeError("simulated crash")


def test_resume_keeps_the_version_and_writes_no_step_twice(tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch0.ckpt"
    options = {"log_dir": tmp_path / "runs", "flush_secs": 3600}
    with pytest.raises(Exception, match="simulated crash"):
        run(
            [("tensorboard", options), SaveAfterEpoch(ckpt, 0), CrashAt(1, 5)],
            max_epochs=3,
            log_every_n_steps=1,
            seed=0,
            record=False,
        )
    run_dir = tmp_path / "runs" / "default" / "version_0"
    # Written after the checkpoint (steps 9 to 13), and on disk despite the crash.
    assert steps(read(run_dir), "train/loss") == list(range(1, 14))

    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["plugins"]["tensorboard"]["version"] == "version_0"
    assert checkpoint["progress"]["global_step"] == STEPS_PER_EPOCH

    logger = TensorBoardLogger(tmp_path / "runs", flush_secs=3600)
    run([logger], max_epochs=3, log_every_n_steps=1, seed=0, fit_kwargs={"ckpt_path": ckpt})
    assert logger.run_dir == run_dir
    assert sorted(os.listdir(run_dir.parent)) == ["version_0"]
    events = read(run_dir)
    assert steps(events, "train/loss") == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert steps(events, "epoch/loss") == [8, 16, 24]
    assert steps(events, "lr/group_0") == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    # The resumed run records its hyperparameters only once: in the fresh run.
    assert set(events.PluginTagToContent("hparams")) == HPARAMS_TAGS


class SaveEveryLastBatch:
    """Saves ``<global step>.ckpt`` at the end of every epoch's last batch."""

    name = "save_every_last_batch"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.epoch_batches_done == STEPS_PER_EPOCH:
            torch.save(trainer.dump_checkpoint(), self.directory / f"{trainer.global_step}.ckpt")


def test_an_epoch_end_written_after_the_checkpoint_is_not_written_again(tmp_path: Path) -> None:
    # The checkpoint holds step 8 before epoch 0's end; the crashed run wrote that
    # end (epoch/*, val/*, lr at step 8), and the resumed run runs it again. The
    # restart marker hides only steps after 8, so step 8 was in the file twice.
    ckpt = tmp_path / "8.ckpt"
    options = {"log_dir": tmp_path / "runs", "flush_secs": 3600}
    with pytest.raises(Exception, match="simulated crash"):
        run(
            [("tensorboard", options), SaveEveryLastBatch(tmp_path), CrashAt(1, 2)],
            max_epochs=2,
            log_every_n_steps=1,
            seed=0,
            record=False,
        )
    logger = TensorBoardLogger(tmp_path / "runs", flush_secs=3600)
    run([logger], max_epochs=2, log_every_n_steps=1, seed=0, fit_kwargs={"ckpt_path": ckpt})
    events = read(tmp_path / "runs" / "default" / "version_0")
    assert steps(events, "epoch/loss") == [8, 16]
    assert steps(events, "val/loss") == [8, 16]
    assert steps(events, "lr/group_0") == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert steps(events, "train/loss") == list(range(1, 2 * STEPS_PER_EPOCH + 1))


class CrashBeforeValidationAt:
    name = "crash_before_validation"

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_validation_start(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_values_an_earlier_restart_marker_hides_are_written_again(tmp_path: Path) -> None:
    # Run A writes epochs ending at 8, 16 and 24. Run B resumes from step 8 (its
    # marker at 9 hides A's later steps) and dies at 16 before that epoch's end;
    # run C resumes from 16. The read-back counted A's hidden step-16 values as
    # written, and C left them out: epoch/loss showed 8 and 24 only.
    options = {"log_dir": tmp_path / "runs", "flush_secs": 3600}
    common = {"max_epochs": 3, "log_every_n_steps": 1, "seed": 0, "record": False}
    run([("tensorboard", options), SaveEveryLastBatch(tmp_path)], **common)
    with pytest.raises(Exception, match="simulated crash"):
        run(
            [("tensorboard", options), SaveEveryLastBatch(tmp_path), CrashBeforeValidationAt(16)],
            fit_kwargs={"ckpt_path": tmp_path / "8.ckpt"},
            **common,
        )
    run([("tensorboard", options)], fit_kwargs={"ckpt_path": tmp_path / "16.ckpt"}, **common)
    events = read(tmp_path / "runs" / "default" / "version_0")
    assert steps(events, "epoch/loss") == [8, 16, 24]
    assert steps(events, "val/loss") == [8, 16, 24]
    assert steps(events, "train/loss") == list(range(1, 3 * STEPS_PER_EPOCH + 1))


def test_resumed_file_sorts_after_the_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # File names hold the creation second, then the host, the process id and a
    # per-process counter, which do not sort by time ("...10" < "...9"). A resumed
    # run's file must sort after the old ones, or TensorBoard reads its restart marker
    # first and purges nothing: it must be created in a later second.
    import hooktrain_tensorboard
    from tensorboard.summary.writer import event_file_writer

    class Clock:
        """Wall time stopped at the start of a second; only ``sleep`` moves it, so
        both runs fall in one second unless the plugin waits for the next."""

        def __init__(self) -> None:
            self.now = float(int(time.time()))

        def time(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

        def monotonic(self) -> float:
            return time.monotonic()

    clock = Clock()
    # TensorBoard's writer names its file from this clock.
    monkeypatch.setattr(event_file_writer, "time", clock)
    monkeypatch.setattr(hooktrain_tensorboard, "time", clock)
    ckpt = tmp_path / "epoch0.ckpt"
    with pytest.raises(Exception, match="simulated crash"):
        run(
            [("tensorboard", {"log_dir": tmp_path}), SaveAfterEpoch(ckpt, 0), CrashAt(1, 3)],
            max_epochs=2,
            log_every_n_steps=1,
            record=False,
        )
    old = set(os.listdir(tmp_path / "default" / "version_0"))
    run(
        [("tensorboard", {"log_dir": tmp_path})],
        max_epochs=2,
        log_every_n_steps=1,
        record=False,
        fit_kwargs={"ckpt_path": ckpt},
    )
    run_dir = tmp_path / "default" / "version_0"
    (resumed,) = set(os.listdir(run_dir)) - old
    (crashed,) = old
    assert int(resumed.split(".")[3]) == int(crashed.split(".")[3]) + 1
    assert sorted(os.listdir(run_dir)) == [crashed, resumed]
    assert steps(read(run_dir), "train/loss") == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_resume_without_tensorboard_state_starts_a_new_version(tmp_path: Path) -> None:
    ckpt = tmp_path / "plain.ckpt"
    run([SaveAfterEpoch(ckpt, 0)], max_epochs=1, record=False)
    run(
        [("tensorboard", {"log_dir": tmp_path})],
        max_epochs=2,
        record=False,
        fit_kwargs={"ckpt_path": ckpt},
    )
    assert steps(read(tmp_path / "default" / "version_0"), "epoch/loss") == [16]


class PretendRankOne:
    """Sets the rank in ``setup``, as a distributed plugin would."""

    name = "rank"

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        trainer.global_rank = 1


def test_only_global_zero_writes(tmp_path: Path) -> None:
    # The rank is set by a plugin listed after this one: the decision must wait.
    run([("tensorboard", {"log_dir": tmp_path}), PretendRankOne()], max_epochs=1, record=False)
    assert not (tmp_path / "default").exists()


def test_importing_or_constructing_the_plugin_does_not_import_tensorboard() -> None:
    # The writer is imported when the first file is opened, on the process that writes.
    code = (
        "import sys, hooktrain_tensorboard\n"
        "hooktrain_tensorboard.TensorBoardLogger('runs', name='x', hparams={'a': 1})\n"
        "assert 'tensorboard' not in sys.modules, 'tensorboard imported'\n"
        "assert 'torch.utils.tensorboard' not in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_installed_under_its_entry_point_name() -> None:
    assert installed_plugins()["tensorboard"].distribution == "hooktrain-tensorboard"
    listing = subprocess.run(
        [sys.executable, "-m", "hooktrain", "plugins"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert "hooktrain-tensorboard" in listing.stdout


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TensorBoardLogger(log_every_n_steps=0)
    with pytest.raises(ValueError, match="flush_secs"):
        TensorBoardLogger(flush_secs=0)
    with pytest.raises(ValueError, match="max_queue"):
        TensorBoardLogger(max_queue=True)
    for version in (-1, False, 2.0, ""):
        with pytest.raises(ValueError, match="version"):
            TensorBoardLogger(version=version)


class SaveAndDieAtFirstEpochsLastBatch:
    """Saves at epoch 0's last batch, then dies before the epoch's end runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        if trainer.current_epoch == 0 and trainer.epoch_batches_done == STEPS_PER_EPOCH:
            torch.save(trainer.dump_checkpoint(), self.path)
            raise KeyboardInterrupt("killed")


def test_a_resume_at_an_epochs_last_step_writes_the_rate_that_step_trained_with(
    tmp_path: Path,
) -> None:
    # The resumed run starts with the epoch's end, whose values are written at step
    # 8; with no step run before it, the rate was read after the scheduler had moved
    # it (1/9, where step 8 trained with 1/8).
    path = tmp_path / "8.ckpt"
    options = {"log_dir": tmp_path, "name": ""}
    train, _ = make_data(n=16 * STEPS_PER_EPOCH, batch_size=16)

    def fit(*plugins, ckpt_path=None) -> None:
        trainer = Trainer(
            plugins=[("tensorboard", options), *plugins], max_epochs=2, device="cpu", seed=0
        )
        trainer.fit(ScheduledModel("step"), train, loss_fn=F.cross_entropy, ckpt_path=ckpt_path)

    with pytest.raises(KeyboardInterrupt):
        fit(SaveAndDieAtFirstEpochsLastBatch(path))
    fit(ckpt_path=path)
    written = {e.step: e.value for e in read(tmp_path / "version_0").Scalars("lr/group_0")}
    assert written[STEPS_PER_EPOCH] == pytest.approx(1 / STEPS_PER_EPOCH)
