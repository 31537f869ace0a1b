"""The pluggy markers for the project name ``hooktrain``.

Plugins decorate their hook implementations with `hookimpl`; the core
declares its hooks with `hookspec`. Kept in a module of their own so that
importing them never imports torch.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "hooktrain"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]
