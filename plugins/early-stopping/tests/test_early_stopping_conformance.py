"""hooktrain's conformance suite for the early-stopping plugin (docs/testing-a-plugin.md)."""

from hooktrain.testing import PluginConformance


class TestEarlyStoppingConformance(PluginConformance):
    # Patience 0 and a threshold the job never meets: it stops after the first epoch
    # that does not improve, so stopping itself is part of what every check runs.
    plugin = ("early_stopping", {"monitor": "val_loss", "patience": 0, "min_delta": 0.5})
    documented_errors = [
        ({"mode": "median"}, "mode must be 'min' or 'max'"),
        ({"patience": -1}, "patience must be an integer >= 0"),
    ]
