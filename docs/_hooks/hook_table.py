"""MkDocs hook: replace ``<!-- hook-table -->`` with a table generated from the hookspecs.

The table (each hook, its kind, its arguments and its docstring's first sentence) is
built from ``hooktrain.hookspecs`` at build time, so it cannot drift from the code.
"""

from __future__ import annotations

import inspect
from typing import Any

MARKER = "<!-- hook-table -->"


def hook_table() -> str:
    from hooktrain import hookspecs

    rows = [
        "| hook | kind | arguments | summary |",
        "|---|---|---|---|",
    ]
    for name, function in vars(hookspecs).items():
        options = getattr(function, "hooktrain_spec", None)
        if options is None:
            continue
        kind = "compute (firstresult)" if options.get("firstresult") else "event"
        params = ", ".join(f"`{p}`" for p in inspect.signature(function).parameters)
        doc = " ".join((inspect.getdoc(function) or "").split("\n\n")[0].split())
        summary = doc.split(". ")[0].rstrip(".") + "." if doc else "(undocumented)"
        anchor = f"hooktrain.hookspecs.{name}"
        rows.append(f"| [`{name}`](#{anchor}) | {kind} | {params} | {summary} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, hook_table())
    return markdown
