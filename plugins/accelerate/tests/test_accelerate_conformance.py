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
        "without dropout, or with a DataLoader generator of its own, it is exact): "
        "accelerate's DataLoaderShard creates its DataLoader iterator lazily, so the "
        "iterator's base-seed draw from torch's global generator comes after the core "
        "restored that generator's state, shifting dropout's random numbers",
    }
