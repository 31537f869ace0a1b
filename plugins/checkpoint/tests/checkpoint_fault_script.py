"""A small training run that the fault tests start, interrupt and restart as a process.

Always called with ``ckpt_path="last"``, the way a user reruns one command after
every crash. It trains a model with dropout on a shuffled DataLoader with Adam and
a step LR scheduler, prints where it ended (``finished global_step=... should_stop=...``)
and on success saves the final model and optimizer state to ``--out``.

``--fault SIGNAL:MOMENT:STEP`` makes the process get ``SIGNAL`` (``SIGKILL``,
``SIGTERM``, or ``SIGXFSZ`` from the kernel) once, at a named moment of global step
``STEP``, so that a test interrupts it at the same place on every machine, however
loaded (see ``Fault``).

With ``--world-size 2`` it joins a gloo process group (rank from ``--rank``) and
implements ``all_reduce`` so that the trainer sees two processes.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hooktrain_checkpoint import read_info
from torch import nn
from torch.utils.data import DataLoader

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data

#: Moments on the training thread, in the batch that makes global step STEP: at its
#: start (a save of the step before may still be being written), after its backward
#: (before the optimizer step), at its end (after the optimizer step, before the
#: checkpoint plugin's step-wise save of STEP, which runs last).
TRAIN_MOMENTS = ("batch-start", "backward", "batch-end")
#: Moments on the checkpoint writer's thread, in writing the ranked checkpoint of STEP:
#: partway through writing its bytes (SIGXFSZ only, see ``Fault``), before its
#: complete temporary file is renamed to its ranked name, before ``last.ckpt`` is
#: replaced by it, and before the checkpoint it evicts (top-k) is removed.
WRITE_MOMENTS = ("write", "rename", "last", "evict")
#: How many bytes of the checkpoint a process killed at the "write" moment has written.
PARTIAL_BYTES = 1024
#: The ranked checkpoints' names, so that the "write" moment can tell their step.
FILENAME = "{epoch}-{step}"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.body(inputs)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]


class Fault:
    """Sends this process a real signal, once, at one chosen moment.

    Sent by the process itself rather than by the test, because a test racing a
    running process lands anywhere or, under load, too late. The kernel delivers a
    signal that the main thread sends itself before ``os.kill`` returns, so a SIGTERM
    handler has run by the next line; SIGKILL ends every thread at once.

    The writer's moments are found with an audit hook (``sys.addaudithook``), which
    Python calls on the writer thread just before each open, rename and removal, with
    the real files in place: the checkpoint plugin is not changed or wrapped. No hook
    runs between the bytes of one write, so the "write" moment lowers the process's
    file size limit (``RLIMIT_FSIZE``) as the checkpoint is opened: the kernel then
    kills the process with SIGXFSZ when it writes past ``PARTIAL_BYTES``.
    """

    name = "fault"

    def __init__(self, spec: str) -> None:
        signame, self.moment, step = spec.split(":")
        self.signame, self.step = signame, int(step)
        # SIGTERM_GROUP: SIGTERM to the whole process group (the DataLoader workers
        # too), sent by another process, as a scheduler does. The process must lead
        # a group of its own (start_new_session), or the test runner gets it too.
        self.group = signame == "SIGTERM_GROUP"
        if self.group and os.getpgid(0) != os.getpid():
            raise ValueError("SIGTERM_GROUP needs a process started in a session of its own")
        self.signum = signal.SIGTERM if self.group else signal.Signals[signame]
        if self.moment not in TRAIN_MOMENTS + WRITE_MOMENTS:
            raise ValueError(f"unknown moment {self.moment!r}")
        expected = {"write": signal.SIGXFSZ}.get(self.moment, signal.SIGKILL)
        if self.moment in WRITE_MOMENTS and self.signum != expected:
            # The main thread would handle a SIGTERM from the writer thread at
            # whatever line it had reached: no exact moment.
            raise ValueError(f"the {self.moment!r} moment takes {expected.name} only")
        self.fired = False
        self._writing: int | None = None  # global step of the checkpoint being written
        if self.moment == "write":
            # Python ignores SIGXFSZ (a write past the limit then fails with EFBIG);
            # by default it ends the process, and would dump core.
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(
                resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1])
            )
        if self.moment in WRITE_MOMENTS:
            sys.addaudithook(self._audit)

    def _fire(self) -> None:
        self.fired = True
        where = f"{self.moment} of step {self.step}"
        print(f"fault: {self.signame} at {where}", file=sys.stderr, flush=True)
        if self.moment == "write":
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (PARTIAL_BYTES, hard))
        elif self.group:
            # From another process: a worker that its own parent signals exits
            # quietly, one signalled by anyone else dies. The main process gets the
            # signal while it waits here, and its handler has run when this returns.
            kill = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
            # The sender leads a group of its own, or it would get the signal too.
            subprocess.run([sys.executable, "-c", kill], check=True, start_new_session=True)
        else:
            os.kill(os.getpid(), self.signum)

    def _at(self, moment: str, step: int) -> None:
        if not self.fired and moment == self.moment and step == self.step:
            self._fire()

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer) -> None:
        self._at("batch-start", trainer.global_step + 1)

    @hookimpl
    def on_after_backward(self, trainer: Trainer) -> None:
        self._at("backward", trainer.global_step + 1)

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        self._at("batch-end", trainer.global_step)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self.fired:
            return
        if event == "open" and isinstance(args[0], str | os.PathLike) and "w" in (args[1] or ""):
            # A ranked checkpoint (or its temporary file) about to be written: its
            # name carries its step.
            found = re.search(r"-step=(\d+)\.ckpt", os.path.basename(os.fsdecode(args[0])))
            if found:
                self._at("write", int(found[1]))
        elif event == "os.rename":  # os.replace too
            source, target = Path(os.fsdecode(args[0])), Path(os.fsdecode(args[1]))
            if target.suffix != ".ckpt":
                return
            # The source is complete here: its record says which save this is.
            self._writing = int(read_info(source).record["global_step"])
            self._at("last" if target.name == "last.ckpt" else "rename", self._writing)
        elif event == "os.remove" and os.fsdecode(args[0]).endswith(".ckpt"):
            # Only eviction removes checkpoints, after the renames of the save it makes room for.
            self._at("evict", -1 if self._writing is None else self._writing)


class Gloo:
    """Two processes on one machine, reduced through torch.distributed (gloo)."""

    name = "gloo"

    def __init__(self, rank: int, world_size: int, init_file: str) -> None:
        self.rank, self.world_size, self.init_file = rank, world_size, init_file

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{self.init_file}",
            rank=self.rank,
            world_size=self.world_size,
        )
        trainer.global_rank, trainer.world_size = self.rank, self.world_size

    @hookimpl
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    @hookimpl
    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    @hookimpl
    def teardown(self) -> None:
        import torch.distributed as dist

        # Both processes meet first: a gloo process whose peer tears down while its
        # own background work is in flight aborts at exit (exit code -6).
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault", default="")
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--init-file", default="")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no-save-last", action="store_true")
    args = parser.parse_args()

    plugins: list[Any] = []
    if args.world_size > 1:
        plugins.append(Gloo(args.rank, args.world_size, args.init_file))
    checkpoint_options = {
        "dirpath": args.dir,
        "filename": FILENAME,
        "every_n_train_steps": args.every,
        "save_last": not args.no_save_last,
    }
    plugins.append(("checkpoint", checkpoint_options))
    if args.fault:
        plugins.append(Fault(args.fault))
    trainer = Trainer(
        plugins=plugins,
        max_epochs=args.epochs,
        seed=7,
        device="cpu",
        accumulate_grad_batches=args.accumulate,
    )
    model = Net()
    train, val = make_data(n=192, batch_size=16, seed=3)
    if args.workers:
        train = DataLoader(train.dataset, batch_size=16, shuffle=True, num_workers=args.workers)
        val = DataLoader(val.dataset, batch_size=16, num_workers=args.workers)
    trainer.fit(model, train, val, loss_fn=F.cross_entropy, ckpt_path="last")
    print(
        f"finished global_step={trainer.global_step} should_stop={trainer.should_stop}", flush=True
    )
    if trainer.should_stop:
        return 0  # stopped by SIGTERM: the checkpoint is on disk, nothing to report
    state = {
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_schedulers[0].state_dict(),
        "global_step": trainer.global_step,
    }
    temp = args.out + ".tmp"
    torch.save(state, temp)
    os.replace(temp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
