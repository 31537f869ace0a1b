"""Shared fixtures for the core's tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


class FakeDistributions:
    """Installs real (if tiny) distributions into a directory on ``sys.path``.

    Each gets a ``*.dist-info`` with ``METADATA`` and ``entry_points.txt``, which is
    exactly what ``importlib.metadata`` reads for a pip-installed package, so the
    plugin discovery under test is the real one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self,
        dist: str,
        entry_points: dict[str, str],
        modules: dict[str, str],
        version: str = "1.0",
        group: str = "hooktrain",
    ) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"[{group}]"] + [f"{name} = {value}" for name, value in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDistributions:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    return FakeDistributions(site)
