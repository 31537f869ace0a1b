"""hooktrain's conformance suite for the fsdp plugin (docs/testing-a-plugin.md).

In one process the plugin makes a one-process group and shards over it, so every
check trains a really sharded model; the two-process check runs it without
accelerate, with which it shares the distributed role."""

from hooktrain.testing import PluginConformance


class TestFsdpConformance(PluginConformance):
    plugin = "fsdp"
    documented_errors = [
        ({"auto_wrap_policy": [3]}, "fsdp: auto_wrap_policy must hold module classes"),
        ({"mp_policy": {"colour": 1}}, "fsdp: mp_policy has no field colour"),
    ]
