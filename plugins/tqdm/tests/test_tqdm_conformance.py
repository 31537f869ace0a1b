"""hooktrain's conformance suite for the tqdm plugin (docs/testing-a-plugin.md)."""

from hooktrain.testing import PluginConformance


class TestTqdmConformance(PluginConformance):
    # Redraw at every batch: the most the plugin does per step.
    plugin = ("tqdm", {"refresh_interval": 0.0, "terminal": True})
    documented_errors = [
        ({"refresh_interval": -1.0}, "refresh_interval must be >= 0"),
        ({"metrics": "loss"}, "metrics must be a list of names"),
    ]
