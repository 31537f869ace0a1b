"""The background writer's thread at interpreter exit, in real child processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
