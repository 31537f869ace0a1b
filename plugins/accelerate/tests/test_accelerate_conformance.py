"""hooktrain's conformance suite for the accelerate plugin (docs/testing-a-plugin.md).

It takes the role distributed, so the two-process check runs it alone."""

from hooktrain.testing import PluginConformance


class TestAccelerateConformance(PluginConformance):
    plugin = "accelerate"
    documented_errors = [
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer"),
    ]
    skip_checks = {
        "resume": "fails today, found by this check: resumed mid-epoch, a model with "
        "dropout trains other weights than uninterrupted (at an epoch boundary, or "
        "without dropout, it is exact); the likely cause is accelerate's DataLoaderShard "
        "creating its DataLoader iterator lazily, so its base-seed draw from torch's "
        "global generator comes after the core restored that generator's state",
    }
