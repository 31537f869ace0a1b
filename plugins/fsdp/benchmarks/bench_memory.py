"""Memory per process, fsdp against DDP (the accelerate plugin), on the CPU.

Run: ``python plugins/fsdp/benchmarks/bench_memory.py`` (``BENCH_WIDTH=2048`` for a wider
model; launches both under
``torchrun --standalone --nproc_per_node 2`` and prints a table). Each process
reports:

* ``resident_peak_mb``: its peak resident memory (``ru_maxrss``) minus its resident
  memory just before the model was built: what training the model cost, on top
  of the interpreter, torch and the process group;
* ``state_mb``: the bytes of the parameters, gradients and optimizer state this
  process holds after training (its local shards under fsdp), counted tensor by
  tensor.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

WIDTH = int(os.environ.get("BENCH_WIDTH", "1024"))
DEPTH = 4


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local(tensor: Any) -> Any:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def worker(plugin: str, out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from hooktrain import Trainer

    options: dict[str, Any] = {"cpu": True} if plugin == "accelerate" else {}
    trainer = Trainer(plugins=[(plugin, options)], seed=0, max_epochs=1, log_every_n_steps=50)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 512, generator=generator)
    targets = torch.randint(0, 10, (512,), generator=generator)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=32, shuffle=True)
    baseline = _rss_mb()
    layers: list[nn.Module] = [nn.Linear(512, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    parameters = sum(p.numel() for p in model.parameters())
    trainer.fit(
        model,
        loader,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-4),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    module = trainer.module
    optimizer = trainer.optimizers[0]
    state = 0
    for p in module.parameters():
        state += _local(p).nbytes
        if p.grad is not None:
            state += _local(p.grad).nbytes
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                state += _local(value).nbytes
    report = {
        "plugin": plugin,
        "rank": trainer.global_rank,
        "parameters": parameters,
        "resident_peak_mb": round(peak - baseline, 1),
        "state_mb": round(state / 2**20, 1),
    }
    (out / f"{plugin}-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("bench-memory")
    out.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    for plugin in ("fsdp", "accelerate"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", "2", __file__, "--worker", plugin, str(out)]
        subprocess.run(command, check=True, env=env)
    print("| plugin | parameters | rank | resident peak over baseline (MB) | state held (MB) |")
    print("|---|---|---|---|---|")
    for plugin in ("fsdp", "accelerate"):
        for rank in (0, 1):
            r = json.loads((out / f"{plugin}-rank{rank}.json").read_text())
            print(
                f"| {plugin} | {r['parameters']:,} | {rank} | {r['resident_peak_mb']} | "
                f"{r['state_mb']} |"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
