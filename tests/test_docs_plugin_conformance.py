"""The plugin that docs/writing-a-plugin.md shows as the one to start from passes the
conformance suite that the same page tells its readers to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hooktrain.testing import PluginConformance

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plugin_with_options.py"


def _example_plugin() -> Any:
    # The example is a script that trains when run: only the part up to its own
    # Trainer(...) line, the imports and the class, is executed here.
    source = EXAMPLE.read_text(encoding="utf-8")
    end = source.index("trainer = Trainer(", source.index("# --8<-- [start:plugin]"))
    namespace: dict[str, Any] = {"__name__": "plugin_with_options_example"}
    exec(compile(source[:end], str(EXAMPLE), "exec"), namespace)
    return namespace["GradNormMonitor"]


class TestTheDocumentedPluginConforms(PluginConformance):
    # Every step logs: a per-step device read (float(norm)) would show as a host sync.
    plugin = (_example_plugin(), {"every_n_steps": 1})
    # The page says options are checked in the constructor; its own example did not,
    # and every_n_steps=0 failed at the first step with a ZeroDivisionError.
    documented_errors = [({"every_n_steps": 0}, "every_n_steps must be an int >= 1, got 0")]
