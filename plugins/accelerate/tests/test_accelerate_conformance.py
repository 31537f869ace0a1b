"""hooktrain's conformance suite for the accelerate plugin (docs/testing-a-plugin.md).

It takes the role distributed, so the two-process check runs it alone."""

from hooktrain.testing import PluginConformance


class TestAccelerateConformance(PluginConformance):
    plugin = "accelerate"
    documented_errors = [
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer"),
    ]
