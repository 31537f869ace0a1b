"""The accelerate plugin's process group: ended together when the script exits."""

from __future__ import annotations

import atexit
import datetime
import sys

_exit_cleanup_registered = False


def destroy_process_group_at_exit() -> None:
    """Wait for every process, then destroy the process group, when the interpreter
    exits.

    A gloo process whose peer exits while its own background work is still in
    flight aborts ("terminate called without an active exception", exit code -6):
    that happened in about a third of finished two-process runs here, turning a
    finished training into a failed job. A barrier first lets every process reach
    the end; destroying the group alone was not enough. The group must outlive every
    fit of the script, so this runs at exit, not in ``teardown``.
    """
    global _exit_cleanup_registered
    if _exit_cleanup_registered:
        return
    _exit_cleanup_registered = True

    def destroy() -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        try:
            # A process dying of an uncaught exception (sys.last_value is set then)
            # does not wait: a peer blocked in a collective it will never join keeps
            # even this barrier from returning on gloo, timeout or not, and the
            # launcher ends the job only once this process has exited.
            if getattr(sys, "last_value", None) is None and dist.get_backend() == "gloo":
                # Bounded: a peer that crashed must not keep this process forever.
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception as exc:  # a peer died; exit anyway, saying why
            print(f"hooktrain-accelerate: processes did not meet at exit: {exc}", file=sys.stderr)
        dist.destroy_process_group()

    atexit.register(destroy)
