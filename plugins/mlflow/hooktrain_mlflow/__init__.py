"""MLflow tracking for hooktrain (entry-point name ``mlflow``), through
``mlflow.MlflowClient``.

Built on `hooktrain.loggers`, the mould the ``tensorboard`` and ``csv`` plugins
share: options checked when constructed, the heavy library imported late,
hyperparameters, the global-zero process alone talking to the server, values waiting
in memory until a flush point, and a resumed run that logs no step twice.

Each fit that does not resume creates a run in ``experiment_name`` and logs:

* params: the trainer's settings, the model's ``hparams`` and the ``hparams`` option;
* metrics against ``trainer.global_step``: ``loss`` and logged values every
  ``log_every_n_steps``, the epoch's training means as ``loss_epoch`` (so a step
  where both are published holds two series, not two values of one), validation
  and test results under their ``val_`` / ``test_`` names;
* with ``log_checkpoints``, the checkpoint plugin's last and best files, as
  artifacts under ``checkpoints/``, when the fit ends;
* status ``FINISHED``; ``FAILED`` when the fit raised (in its teardown too);
  ``KILLED`` when a plugin stopped it from outside (``trainer.interrupted``: the
  checkpoint plugin on SIGTERM), which also uploads no checkpoint. A resume makes
  the run ``RUNNING`` again.

The run's id goes into every checkpoint; a fit resumed from one reopens that run, reads
back the last step each metric holds (``MlflowClient.get_metric_history``) and logs
only what is past it, so the steps the interrupted run logged after the checkpoint
are not logged twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from hooktrain import hookimpl
from hooktrain.errors import ConfigurationError, warn_user
from hooktrain.loggers import (
    FlushSchedule,
    LoggedSteps,
    check_flags_and_hparams,
    checkpoint_files,
    collect_hparams,
    hparam_value,
    load_state,
    metric_key,
    save_state,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hooktrain.trainer import Trainer

__all__ = ["MLFlowLogger"]
__version__ = "0.1.0"

#: MLflow's REST API takes at most this many metrics, and this many params, per
#: ``log_batch`` request.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100


class MLFlowLogger:
    """A hooktrain plugin logging to MLflow (entry-point name ``mlflow``).

    :param tracking_uri: where the runs go: ``http://host:port`` for a tracking
        server, a database or folder URI; ``None`` uses MLflow's own default (the
        ``MLFLOW_TRACKING_URI`` environment variable, else a local store).
    :param experiment_name: the experiment the runs go to, created when missing.
    :param run_name: the run's name; ``None`` lets MLflow make one up.
    :param tags: tags set on each run this plugin creates.
    :param log_checkpoints: when a fit ends, log the last and the best checkpoint
        of every selected plugin that keeps them (one with ``last_model_path`` and
        ``best_model_path`` attributes, as the ``checkpoint`` plugin has) as
        artifacts under ``checkpoints/``.
    :param log_hparams: log the hyperparameters as params when a run is created.
    :param hparams: more hyperparameters to log with the trainer's settings.
    :param flush_secs: published values are sent at least this often, in seconds
        (checked whenever values are published), and at every epoch's end (at most
        once a second), checkpoint, exception and teardown: one ``log_batch``
        request each time.
    :param max_queue: publications kept waiting before they are sent; ``1`` sends
        each one as it is published.
    :param start_timeout: seconds a tracking server has to answer when a fit starts,
        tried once, before MLflow's own retries (several minutes by default) apply
        to the requests that follow.
    :raises ConfigurationError: (a ``ValueError``) ``flush_secs`` is not > 0,
        ``max_queue`` or ``start_timeout`` is not an integer >= 1, or ``tags`` is not
        a mapping.
    :raises ImportError: the ``mlflow`` package is not installed.
    """

    #: Registered under this name when passed as an object.
    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment_name: str = "Default",
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        log_checkpoints: bool = False,
        log_hparams: bool = True,
        hparams: Mapping[str, Any] | None = None,
        flush_secs: float = 5.0,
        max_queue: int = 1000,
        start_timeout: int = 5,
    ) -> None:
        self._schedule = FlushSchedule(flush_secs, max_queue, owner="mlflow")
        if type(start_timeout) is not int or start_timeout < 1:
            # MLflow reads its request timeout as a whole number of seconds.
            raise ConfigurationError(
                f"mlflow: start_timeout must be an integer >= 1, got {start_timeout!r}"
            )
        check_flags_and_hparams(
            "mlflow", hparams, log_checkpoints=log_checkpoints, log_hparams=log_hparams
        )
        if tags is not None and not isinstance(tags, Mapping):
            raise ConfigurationError(
                f"mlflow: tags must be a dict of tag names to values, got {type(tags).__name__}"
            )
        # Only looked up here: importing mlflow takes seconds, paid when a fit starts
        # on the process that logs.
        if importlib.util.find_spec("mlflow") is None:
            raise ImportError(
                "the hooktrain 'mlflow' plugin needs the 'mlflow' package: pip install mlflow"
            )
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.log_checkpoints = log_checkpoints
        self.log_hparams = log_hparams
        self.extra_hparams = dict(hparams or {})
        self.start_timeout = start_timeout

        #: The id of the MLflow run of the latest fit (validate and test log into
        #: it too); ``None`` before, and on processes other than the global-zero one.
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        # (key, value, timestamp in ms, step) waiting for a flush point.
        self._pending: list[tuple[str, float, int, int]] = []
        self._publications = 0
        self._logged = LoggedSteps()
        # Set by on_load_checkpoint: the run id the checkpoint names (None when none).
        self._resume: tuple[str | None] | None = None
        # The run this stage created or reopened, which its teardown ends.
        self._ending: str | None = None
        self._failed = False
        # Whether a write of this fit's values went through (the first goes at once).
        self._sent = False

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_load_checkpoint(self, trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
        own = load_state(trainer, self, checkpoint)
        self._resume = (str(own["run_id"]) if own and own.get("run_id") else None,)

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        save_state(trainer, self, checkpoint, {"run_id": self.run_id})
        # What was published before the checkpoint is in the run when the checkpoint
        # is, and the publication right after it (its own step's) goes at once: a
        # resumed run publishes neither again.
        try:
            self._flush()
        except Exception as error:
            # The checkpoint matters more than its logs: a failed write must not
            # cancel the save. The values wait, and the next write tries them again
            # (and raises, when the server still refuses them).
            warn_user(
                f"hooktrain-mlflow: could not send the values published before the "
                f"checkpoint at step {trainer.global_step} to {self._uri()} "
                f"({type(error).__name__}: {error}); the checkpoint is saved without them"
            )
            return
        self._schedule.checkpointed()

    @hookimpl
    def prepare(self, trainer: Trainer, stage: str) -> None:
        # The server is asked here, before any plugin's on_fit_start (or a whole
        # evaluation pass): a stage it refuses then leaves no empty run folder
        # behind in TensorBoard's or CSV's directory. Predict logs nothing.
        if stage != "predict" and trainer.is_global_zero:
            self._connect()

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        resume, self._resume = self._resume, None
        self._pending, self._publications, self._logged = [], 0, LoggedSteps()
        self._failed = self._sent = False
        self.run_id = None
        if not trainer.is_global_zero:
            return
        client = self._connect()
        run_id = resume[0] if resume else None
        if run_id is not None and not self._reopen(client, run_id):
            print(
                f"hooktrain-mlflow: run {run_id} from the checkpoint is not in "
                f"{self._uri()}: logging the resumed fit to a new run",
                file=sys.stderr,
            )
            run_id = None
        if run_id is None:
            self.run_id = self._create_run(client, trainer)
        else:
            self.run_id = run_id
            self._logged = _logged_steps(client, run_id, trainer.global_step)
        self._ending = self.run_id

    @hookimpl
    def log_metrics(
        self, trainer: Trainer, metrics: Mapping[str, float], step: int, scope: str
    ) -> None:
        """Keep what the trainer published (floats already: no device sync)."""
        if not trainer.is_global_zero:
            return
        if self.run_id is None:  # validate or test before any fit
            self.run_id = self._ending = self._create_run(self._connect(), trainer)
        values = {metric_key(name, scope): value for name, value in metrics.items()}
        if trainer.stage == "fit":
            # Only a resumed fit meets steps its run holds already.
            values = self._logged.fresh(values, step)
        timestamp = int(time.time() * 1000)
        self._pending.extend((key, value, timestamp, step) for key, value in values.items())
        self._publications += 1
        # The first publication goes at once: a name or value the server refuses
        # is then reported at the first log point, not minutes into training.
        if self._schedule.due(scope, self._publications) or not self._sent:
            self._flush()

    @hookimpl
    def on_exception(self) -> None:
        self._failed = True
        self._flush()

    # tryfirst wrapper: the outermost teardown, so its second half runs after every
    # other plugin's teardown, the checkpoint plugin's wait for its last write included.
    @hookimpl(wrapper=True, tryfirst=True)
    def teardown(self, trainer: Trainer, stage: str) -> Generator[None, None, None]:
        try:
            return (yield)
        except BaseException:
            self._failed = True  # another plugin's teardown raised: so does the fit
            raise
        finally:
            self._end(trainer, stage)

    # ------------------------------------------------------------------ helpers

    def _end(self, trainer: Trainer, stage: str) -> None:
        run_id, self._ending = self._ending, None
        if run_id is None or self._client is None:
            self._flush()  # a validate or test logging into the latest fit's run
            return
        # A fit stopped from outside (SIGTERM) ends KILLED, not FINISHED, and its
        # best file so far is not uploaded: the resume may rank it out, and an
        # artifact cannot be removed from a run again.
        interrupted = stage == "fit" and trainer.interrupted
        try:
            self._flush()
            if stage == "fit" and self.log_checkpoints and not (self._failed or interrupted):
                self._upload_checkpoints(trainer, run_id)
        except BaseException:
            self._failed = True
            raise
        finally:
            status = "FAILED" if self._failed else "KILLED" if interrupted else "FINISHED"
            self._client.set_terminated(run_id, status=status)

    def _upload_checkpoints(self, trainer: Trainer, run_id: str) -> None:
        """The checkpoint plugin's last and best files under ``checkpoints/``; a
        sharded checkpoint (a directory) whole, under its name."""
        assert self._client is not None
        held = {a.path: a.is_dir for a in self._client.list_artifacts(run_id, "checkpoints")}
        for path in checkpoint_files(trainer):
            folder = "checkpoints"
            sharded = path.is_dir()
            if held.get(f"{folder}/{path.name}", sharded) != sharded:
                # A resume changed the kind (sharded, one file) under a name the run
                # holds as the other kind, which no upload can replace.
                kind = "sharded" if sharded else "single_file"
                warn_user(
                    f"hooktrain-mlflow: the run holds {folder}/{path.name} as a "
                    f"{'file' if sharded else 'folder'} (a checkpoint of the other "
                    f"kind, from before the resume); this one is uploaded as "
                    f"{folder}/{kind}/{path.name}"
                )
                folder = f"{folder}/{kind}"
            if sharded:
                where = f"{folder}/{path.name}"
                self._client.log_artifacts(run_id, str(path), artifact_path=where)
            else:
                self._client.log_artifact(run_id, str(path), artifact_path=folder)

    def _uri(self) -> str:
        if self.tracking_uri is not None:
            return self.tracking_uri
        import mlflow

        return mlflow.get_tracking_uri()

    def _connect(self) -> MlflowClient:
        """The client, once the tracking server has answered a request.

        :raises ConfigurationError: when its first request failed (refused, an error
            answer, or none within ``start_timeout`` seconds).
        """
        if self._client is not None:
            return self._client
        from mlflow import MlflowClient

        uri = self._uri()
        try:
            client = MlflowClient(self.tracking_uri)
        except Exception as exc:  # MLflow's own exceptions for a URI it cannot use
            raise ConfigurationError(
                f"mlflow: tracking_uri {uri!r} is not one MLflow can use "
                f"({type(exc).__name__}: {_first_line(exc)}); pass an http(s):// server, "
                f"a file path or a database URI"
            ) from exc
        try:
            with _single_quick_attempt(self.start_timeout):
                experiment = client.get_experiment_by_name(self.experiment_name)
        except Exception as exc:
            raise ConfigurationError(
                f"mlflow: no working tracking server at {uri} (tried for up to "
                f"{self.start_timeout} s; {type(exc).__name__}: {_first_line(exc)}); start "
                f"it, or pass tracking_uri=... for one that runs"
            ) from exc
        if experiment is None:
            client.create_experiment(self.experiment_name)
        self._client = client
        return client

    def _create_run(self, client: MlflowClient, trainer: Trainer) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        run = client.create_run(experiment.experiment_id, tags=self.tags, run_name=self.run_name)
        run_id: str = run.info.run_id
        if self.log_hparams:
            from mlflow.entities import Param

            params = collect_hparams(trainer, self.extra_hparams)
            entries = [Param(key, str(hparam_value(value))) for key, value in params.items()]
            for start in range(0, len(entries), _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=entries[start : start + _MAX_PARAMS_PER_BATCH])
        return run_id

    @staticmethod
    def _reopen(client: MlflowClient, run_id: str) -> bool:
        """Mark an existing, not deleted run as running again; ``False`` when the
        store does not hold it."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage != "active":
            return False
        client.update_run(run_id, status="RUNNING")
        return True

    def _flush(self) -> None:
        """Send the waiting values, one ``log_batch`` request per 1000."""
        if self._client is None or self.run_id is None:
            return
        pending, self._pending = self._pending, []
        self._publications = 0
        if pending:
            from mlflow.entities import Metric

            metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in pending]
            for start in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
                try:
                    self._client.log_batch(
                        self.run_id, metrics=metrics[start : start + _MAX_METRICS_PER_BATCH]
                    )
                except BaseException:
                    self._pending = pending[start:] + self._pending  # sent again next time
                    raise
            self._sent = True
        self._schedule.done()


def _logged_steps(client: MlflowClient, run_id: str, resumed_at: int) -> LoggedSteps:
    """The steps each metric of the run holds: the last up to ``resumed_at`` (the
    checkpoint's global step), and every one past it, which the resumed fit may
    publish again or, with another ``log_every_n_steps``, between."""
    keys = client.get_run(run_id).data.metrics.keys()
    return LoggedSteps.from_records(
        ((key, metric.step) for key in keys for metric in client.get_metric_history(run_id, key)),
        after=resumed_at,
    )


@contextlib.contextmanager
def _single_quick_attempt(timeout: int) -> Iterator[None]:
    """MLflow's HTTP requests, inside the block: one try, ``timeout`` seconds. Its
    defaults (several retries with exponential backoff, 120 s each) would make an
    unreachable server take minutes to report. MLflow reads these variables at each
    request; they are put back afterwards."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
