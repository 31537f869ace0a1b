"""hooktrain's conformance suite for the compile plugin (docs/testing-a-plugin.md),
with dynamo's ``eager`` backend: every step is traced, no code is generated."""

from hooktrain.testing import PluginConformance


class TestCompileConformance(PluginConformance):
    plugin = ("compile", {"backend": "eager"})
    documented_errors = [
        ({"backend": "no-such-backend"}, "compile: unknown backend"),
        ({"fullgraph": "yes"}, "compile: fullgraph must be True or False"),
    ]
