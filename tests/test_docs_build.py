"""The documentation site builds with ``mkdocs build --strict`` (as CI builds it), and
the built reference holds every hook."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hooktrain import hookspecs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings")),
    reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings[python]) is not installed",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def test_the_site_builds_strictly(site: Path) -> None:
    for page in (
        "index.html",
        "getting-started/index.html",
        "hook-order/index.html",
        "writing-a-plugin/index.html",
        "ordering-and-wrappers/index.html",
        "testing-a-plugin/index.html",
        "troubleshooting/index.html",
        "architecture/index.html",
        "reference/hooks/index.html",
        "plugins/early-stopping/index.html",
    ):
        assert (site / page).is_file(), page


def test_every_hook_is_in_the_built_reference(site: Path) -> None:
    html = (site / "reference" / "hooks" / "index.html").read_text(encoding="utf-8")
    hooks = [n for n, f in vars(hookspecs).items() if hasattr(f, "hooktrain_spec")]
    missing = [n for n in hooks if f'id="hooktrain.hookspecs.{n}"' not in html]
    assert missing == [], f"hooks without a section in the reference: {missing}"
    in_table = set(re.findall(r'href="#hooktrain\.hookspecs\.(\w+)"', html))
    assert set(hooks) <= in_table


def test_includes_were_expanded(site: Path) -> None:
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "--8&lt;--" not in text and "--8<--" not in text, page
    order = (site / "hook-order" / "index.html").read_text(encoding="utf-8")
    assert "on_before_optimizer_step" in order and "log_metrics" in order
