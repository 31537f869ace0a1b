"""hooktrain's conformance suite for the checkpoint plugin (docs/testing-a-plugin.md).

It takes the role checkpoint-io, so the exact-resume check uses it as the checkpoint
plugin: it must save on SIGTERM and resume from ``ckpt_path="last"`` itself."""

from hooktrain.testing import PluginConformance


class TestCheckpointConformance(PluginConformance):
    # Saving at epoch ends, ranked: a save every N steps reads the state every N steps,
    # which the host-sync check would rightly count.
    plugin = ("checkpoint", {"monitor": "val_loss", "save_top_k": 2})
    # Numbers the saves in order: the interrupted run made one more, its SIGTERM save.
    run_specific_state = ["sequence"]
    documented_errors = [
        ({"mode": "median"}, "mode must be 'min' or 'max'"),
        ({"save_top_k": -2}, "save_top_k must be an integer >= -1"),
        ({"filename": "a/b"}, "filename must be a plain name pattern"),
        # Both failed at the first save, an epoch in, or wrote '{epoch.ckpt'.
        ({"filename": "{val_loss:.3q}"}, "has a format its value \\(float\\) refuses"),
        ({"filename": "{epoch"}, "has a brace that opens or closes no field"),
    ]
