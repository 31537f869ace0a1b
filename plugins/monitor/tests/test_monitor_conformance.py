"""hooktrain's conformance suite for the monitor plugin (docs/testing-a-plugin.md)."""

from hooktrain.testing import PluginConformance


class TestMonitorConformance(PluginConformance):
    plugin = "monitor"
    # Throughput is measured on the clock: a resumed run's differs.
    wall_clock_metrics = ("samples_per_sec", "steps_per_sec")
    documented_errors = [
        ({"lr": "yes"}, "monitor: lr must be True or False"),
        ({"clock": 3}, "monitor: clock must be callable"),
    ]
