"""hooktrain's conformance suite for the csv plugin (docs/testing-a-plugin.md)."""

from hooktrain.testing import PluginConformance


class TestCsvConformance(PluginConformance):
    # A relative folder: every run of a check has a working directory of its own.
    plugin = ("csv", {"log_dir": "csv_logs", "max_queue": 1})
    documented_errors = [
        ({"flush_secs": 0}, "csv: flush_secs must be > 0"),
        ({"max_queue": 0}, "csv: max_queue must be an integer >= 1"),
    ]
