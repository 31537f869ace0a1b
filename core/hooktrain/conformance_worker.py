"""One process of `PluginConformance`'s two-process check.

Run by the check as ``python -m torch.distributed.run ... -m
hooktrain.conformance_worker MODULE_PATH CLASS OUT_DIR``: each process trains the
check's job and saves its rank's weights as ``OUT_DIR/rank<N>.pt``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hooktrain.conformance_support import TrainingJob, declared_plugin, fresh_selection

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """One process of the two-process check: import the test class from its file,
    train with accelerate (unless the plugin takes the role ``distributed`` itself)
    and save this rank's weights."""
    import torch

    from hooktrain.plugins import exclusive_roles, resolve_plugins

    path, class_name, out = argv
    sys.path.insert(0, str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(f"_conformance_{class_name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw = declared_plugin(getattr(module, class_name))
    ((name, obj),) = resolve_plugins([fresh_selection(raw)])
    plugins = [fresh_selection(raw)]
    if "distributed" not in exclusive_roles(name, obj):
        # A GPU machine may have fewer GPUs than processes: the check is about the
        # plugin, so it runs on the CPU there too.
        options = {"cpu": True} if torch.cuda.is_available() else {}
        plugins.insert(0, ("accelerate", options))
    job = TrainingJob()
    weights = job.fit(plugins)
    trainer = job.trainer
    torch.save(
        {"world_size": trainer.world_size, "weights": weights},
        Path(out) / f"rank{trainer.global_rank}.pt",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
