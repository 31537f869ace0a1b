"""The background writer's thread at interpreter exit, in real child processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hooktrain.testing import run

# A write in flight when the script ends, and no close(): the plugin's teardown
# never ran (it raised earlier, or the fit was abandoned).
SCRIPT = """
import sys, threading
from pathlib import Path
from hooktrain_checkpoint.writer import BackgroundWriter

started = threading.Event()

def write():
    started.set()
    threading.Event().wait(0.5)  # a slow disk
    Path(sys.argv[1]).write_text("complete")

writer = BackgroundWriter()
writer.submit(write, "test.ckpt")
started.wait()
"""


def test_exit_waits_for_the_write_in_flight_and_then_ends(tmp_path: Path) -> None:
    target = tmp_path / "written"
    # The timeout only turns a hang (a thread nobody ends) into a failure.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert target.read_text() == "complete"  # not cut short


def test_an_error_of_the_last_write_is_printed_at_exit(tmp_path: Path) -> None:
    failing = SCRIPT.replace(
        'Path(sys.argv[1]).write_text("complete")', "raise OSError('disk full')"
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(failing), str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "writing checkpoint test.ckpt failed: OSError: disk full" in done.stderr


class SlicedTable(torch.nn.Module):
    """A model whose buffer is a small view of a large tensor (4 MB of storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.register_buffer("rows", torch.zeros(1 << 20)[:16])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_view_is_saved_without_the_rest_of_its_storage(tmp_path: Path, async_save) -> None:
    # torch.save writes a tensor's whole storage: a synchronous save written from the
    # live state held 4 MB for a buffer of 16 numbers.
    options = {"dirpath": tmp_path, "async_save": async_save, "save_top_k": 0}
    run([("checkpoint", options)], model=SlicedTable(), max_epochs=1, record=False)
    assert (tmp_path / "last.ckpt").stat().st_size < 100_000
