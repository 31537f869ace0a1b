"""hooktrain's conformance suite for the amp plugin (docs/testing-a-plugin.md).

The two-process check is skipped by the suite itself: amp takes the role precision,
which accelerate holds there."""

from hooktrain.testing import PluginConformance


class TestAmpConformance(PluginConformance):
    plugin = ("amp", {"precision": "bf16"})
    documented_errors = [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"scaler": "yes"}, "scaler must be True, False or None"),
    ]
