"""hooktrain's conformance suite for the tensorboard plugin (docs/testing-a-plugin.md)."""

from hooktrain.testing import PluginConformance


class TestTensorBoardConformance(PluginConformance):
    # A relative folder: every run of a check has a working directory of its own.
    plugin = ("tensorboard", {"log_dir": "tb", "log_every_n_steps": 1})
    documented_errors = [
        ({"flush_secs": 0}, "flush_secs must be > 0"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be an integer >= 1"),
    ]
