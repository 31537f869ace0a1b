"""hooktrain's conformance suite for the mlflow plugin (docs/testing-a-plugin.md).

Each run of a check logs into a SQLite store in its own working directory, through
MLflow's own client: the store is real, only no server is started (the plugin's
server tests are in test_mlflow.py)."""

import pytest

from hooktrain.testing import PluginConformance

pytest.importorskip("mlflow")


class TestMlflowConformance(PluginConformance):
    plugin = ("mlflow", {"tracking_uri": "sqlite:///mlflow.db", "experiment_name": "conformance"})
    documented_errors = [
        ({"flush_secs": 0}, "mlflow: flush_secs must be > 0"),
        ({"start_timeout": 0}, "mlflow: start_timeout must be an integer >= 1"),
    ]
