"""Side-by-side timing of hooktrain against a hand-written PyTorch loop.

Run it from the repository root after installing hooktrain::

    python benchmarks/bench.py              # the full run recorded in docs/benchmarks.md
    python benchmarks/bench.py --rounds 5   # full sizes, few rounds: a rough look
    python benchmarks/bench.py --quick      # a few seconds, to check it still works

Every variant trains the same model on the same data for the same number of
steps from the same seed:

a. a hand-written loop, the best a careful user writes: each step's detached
   loss kept in a list and reduced once per epoch;
b. hooktrain with no plugins;
c. hooktrain with the progress bar, TensorBoard and checkpoint (every epoch)
   plugins, selected by entry-point name (skipped when they are not installed);
d. Lightning with its progress bar, logger, checkpointing and summary off;
e. Lightning with them on and ``self.log`` every step (d and e only when
   Lightning is installed).

The variants run interleaved (a b c d e a b c d e ...) after one warm-up round,
so that a slow moment of a shared machine hits all of them alike. For each round
the time of each variant is divided by the raw loop's time of the same round; the
script prints, per workload, the median of these paired ratios, which is what the
overhead budget in docs/benchmarks.md is stated in, and their spread (smallest,
quartiles, largest). The whole ``fit`` call is timed (setup included), and the
whole raw loop (optimizer creation included).

torch runs on one thread (``--threads``) so that the two cores of a small machine
do not make the timings noisy. Progress bars write to ``os.devnull`` so that the
speed of the terminal is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

#: The clock every variant is timed with; ``--clock cpu`` switches to the process's
#: CPU time, which a busy shared machine disturbs less than wall time.
CLOCK: Callable[[], float] = time.perf_counter

# --------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@dataclass
class Workload:
    """A model factory and its training data; every variant gets a fresh model.

    With ``loss_fn`` the model is a plain module trained with SGD; without, the
    model defines ``training_step`` and ``configure_optimizers`` itself.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[], Any]
    epochs: int
    steps_per_epoch: int
    loss_fn: Callable[..., torch.Tensor] | None = None
    lr: float = 0.05

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    """scikit-learn's bundled 8x8 digits (no download), or None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    images, labels = load_digits(return_X_y=True)
    return (
        torch.tensor(images, dtype=torch.float32) / 16.0,
        torch.tensor(labels, dtype=torch.long),
    )


def mlp_workload(steps_per_epoch: int, epochs: int, seed: int = 0) -> Workload:
    """A tiny MLP on pre-batched tensors: steps of well under a millisecond, so
    whatever the trainer adds per step shows."""
    hidden, classes, batch = 64, 10, 32
    generator = torch.Generator().manual_seed(seed)
    digits = _digits()
    if digits is None:  # a learnable stand-in of the same shape
        inputs = torch.rand(1797, 64, generator=generator)
        digits = inputs, (inputs @ torch.randn(64, classes, generator=generator)).argmax(1)
    inputs, labels = digits
    batches = []
    while len(batches) < steps_per_epoch:  # cycle through reshuffled copies
        order = torch.randperm(len(inputs), generator=generator)
        for begin in range(0, len(order) - batch + 1, batch):
            index = order[begin : begin + batch]
            batches.append((inputs[index], labels[index]))
    del batches[steps_per_epoch:]

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    return Workload(
        name="mlp",
        description=(
            f"MLP 64-{hidden}-{classes} on the digits, {steps_per_epoch} pre-batched batches "
            f"of {batch} per epoch, {epochs} epochs, SGD"
        ),
        make_model=lambda: _seeded(seed, build),
        make_data=lambda: batches,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        loss_fn=F.cross_entropy,
    )


def conv_workload(steps_per_epoch: int, epochs: int, seed: int = 0) -> Workload:
    """``examples/convolutional.py``'s network (its own ``training_step`` and
    ``configure_optimizers``: AdamW and StepLR) on the digits, through a shuffling
    ``DataLoader`` of batch 32. ``steps_per_epoch`` caps the epoch (0: all of it)."""
    sys.path.insert(0, EXAMPLES)
    try:
        from convolutional import DigitsCNN
        from digits_data import digits_loaders
    finally:
        sys.path.remove(EXAMPLES)
    loader, _ = digits_loaders(batch_size=32, seed=seed)
    dataset = loader.dataset
    if steps_per_epoch:
        dataset = torch.utils.data.Subset(dataset, range(min(len(dataset), 32 * steps_per_epoch)))

    def data() -> DataLoader:
        return DataLoader(dataset, batch_size=32, shuffle=True)

    steps = len(data())
    return Workload(
        name="conv",
        description=(
            f"examples/convolutional.py's DigitsCNN, DataLoader(shuffle=True) over "
            f"{len(dataset)} digits, batch 32, {epochs} epochs, AdamW + StepLR"
        ),
        make_model=lambda: _seeded(seed, DigitsCNN),
        make_data=data,
        epochs=epochs,
        steps_per_epoch=steps,
    )


# --------------------------------------------------------------------------------
# Variants: each trains a fresh model and returns (seconds, final loss)
# --------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    run: Callable[[Workload, nn.Module, Any, str], float] | None
    skipped: str | None = None
    #: Runs in every ``every``-th round only (the slow Lightning variants), so that
    #: the budgeted variants get many rounds in the same time.
    every: int = 1
    seconds: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)


def run_raw(workload: Workload, model: nn.Module, data: Any, workdir: str) -> float:
    """The best loop a careful user writes: no per-step ``.item()`` and no per-step
    arithmetic on the loss either; each step's detached loss goes into a list, which
    is reduced once per epoch for the epoch's mean loss."""
    start = CLOCK()
    model.train()
    scheduler = None
    if workload.loss_fn is None:
        config = model.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config.get("lr_scheduler")
    else:
        optimizer = _sgd(workload)(model.parameters())
    for _epoch in range(workload.epochs):
        # A running sum on the device (``total += loss.detach()``) launches an
        # addition per step, about 6% of a 250 us MLP step; appending to a list costs
        # a fraction of that, and the ratios should be against the best hand loop.
        losses: list[torch.Tensor] = []
        for batch_idx, (inputs, targets) in enumerate(data):
            optimizer.zero_grad(set_to_none=True)
            if workload.loss_fn is None:
                loss = model.training_step((inputs, targets), batch_idx)
            else:
                loss = workload.loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        if scheduler is not None:
            scheduler.step()
        epoch_loss = torch.stack(losses).mean().item()  # noqa: F841 - what a user would print
    return CLOCK() - start


def _sgd(workload: Workload) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=workload.lr, momentum=0.9)


def hooktrain_runner(plugins: Callable[[str], list[Any]]):
    def run(workload: Workload, model: nn.Module, data: Any, workdir: str) -> float:
        from hooktrain import Trainer

        trainer = Trainer(plugins=plugins(workdir), max_epochs=workload.epochs, device="cpu")
        start = CLOCK()
        if workload.loss_fn is None:
            trainer.fit(model, data)
        else:
            trainer.fit(model, data, loss_fn=workload.loss_fn, optimizer=_sgd(workload))
        return CLOCK() - start

    return run


FIRST_PARTY = ("tqdm", "tensorboard", "checkpoint")


def first_party_plugins(workdir: str) -> list[Any]:
    """The progress bar, TensorBoard and a checkpoint written every epoch."""
    return [
        "tqdm",
        ("tensorboard", {"log_dir": os.path.join(workdir, "tb")}),
        ("checkpoint", {"dirpath": os.path.join(workdir, "ckpt"), "every_n_epochs": 1}),
    ]


def lightning_runner(extras: bool):
    def run(workload: Workload, model: nn.Module, data: Any, workdir: str) -> float:
        import lightning as L

        for logger_name in ("lightning.pytorch", "lightning.fabric"):
            # Its info lines go to a handler bound at import to the real stderr.
            logging.getLogger(logger_name).setLevel(logging.ERROR)

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                if workload.loss_fn is None:
                    loss = self.model.training_step(batch, batch_idx)
                else:
                    inputs, targets = batch
                    loss = workload.loss_fn(self.model(inputs), targets)
                if extras:
                    self.log("loss", loss, prog_bar=True)
                return loss

            def configure_optimizers(self) -> Any:
                if workload.loss_fn is None:
                    return self.model.configure_optimizers()
                return _sgd(workload)(self.parameters())

        module = Module()
        if extras:
            from lightning.pytorch.callbacks import ModelCheckpoint
            from lightning.pytorch.loggers import TensorBoardLogger

            options: dict[str, Any] = {
                "logger": TensorBoardLogger(os.path.join(workdir, "tb")),
                "callbacks": [ModelCheckpoint(os.path.join(workdir, "ckpt"), every_n_epochs=1)],
                "enable_progress_bar": True,
                "log_every_n_steps": 50,
            }
        else:
            options = {
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
            }
        trainer = L.Trainer(
            max_epochs=workload.epochs,
            accelerator="cpu",
            devices=1,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **options,
        )
        if isinstance(data, list):
            data = _Batches(data)  # Lightning reads a list as several dataloaders
        start = CLOCK()
        trainer.fit(module, data)
        return CLOCK() - start

    return run


class _Batches:
    """A list of batches seen as one iterable (for Lightning)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _missing_plugins(names: tuple[str, ...]) -> list[str]:
    from hooktrain.plugins import installed_plugins

    installed = installed_plugins()
    return [name for name in names if name not in installed]


def make_variants(with_lightning: bool, lightning_every: int = 1) -> list[Variant]:
    variants = [
        Variant("a", "raw PyTorch loop", run_raw),
        Variant("b", "hooktrain, no plugins", hooktrain_runner(lambda _: [])),
    ]
    missing = _missing_plugins(FIRST_PARTY)
    variants.append(
        Variant(
            "c",
            "hooktrain + tqdm, tensorboard, checkpoint",
            None if missing else hooktrain_runner(first_party_plugins),
            f"not installed: {', '.join(missing)} (pip install -e plugins/<name>)"
            if missing
            else None,
        )
    )
    has_lightning = importlib.util.find_spec("lightning") is not None
    reason = None
    if not with_lightning:
        reason = "--no-lightning"
    elif not has_lightning:
        reason = "Lightning is not installed (pip install lightning)"
    variants.append(
        Variant(
            "d",
            "Lightning, extras off",
            lightning_runner(False) if reason is None else None,
            reason,
            every=lightning_every,
        )
    )
    variants.append(
        Variant(
            "e",
            "Lightning, bar + TensorBoard + checkpoint + log",
            lightning_runner(True) if reason is None else None,
            reason,
            every=lightning_every,
        )
    )
    return variants


# --------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Progress bars and warnings go to ``os.devnull`` while a variant runs."""
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
    ):
        yield


def time_workload(workload: Workload, variants: list[Variant], rounds: int) -> None:
    active = [v for v in variants if v.run is not None]
    for round_index in range(rounds + 1):  # round 0 warms up and is dropped
        for variant in active:
            if round_index % variant.every:
                continue
            model = workload.make_model()
            data = workload.make_data()
            workdir = tempfile.mkdtemp(prefix=f"hooktrain-bench-{variant.key}-")
            # Each variant starts clean: no garbage another one left for the cyclic
            # collector, no file writes of another one still queued in the kernel.
            gc.collect()
            try:
                with quiet():
                    seconds = variant.run(workload, model, data, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                if hasattr(os, "sync"):
                    os.sync()
            if round_index:
                variant.seconds.append(seconds)
                variant.rounds.append(round_index)


def report_workload(workload: Workload, variants: list[Variant], rounds: int) -> None:
    """Per variant: the median time per step, and the median of its paired ratios to
    the raw loop with their spread (min, quartiles, max over the rounds)."""
    print(f"\n## workload {workload.name}: {workload.description}")
    print(
        f"   {workload.steps} steps per run, {rounds} interleaved rounds; ratios are "
        f"per round (variant / a of the same round): their median, min, quartiles, max"
    )
    raw = dict(zip(variants[0].rounds, variants[0].seconds, strict=True))
    print(
        f"   {'variant':<50} {'us/step':>9} {'median':>7} {'min':>7} {'q1':>7} {'q3':>7} "
        f"{'max':>7}  rounds"
    )
    summaries = []
    for variant in variants:
        title = f"{variant.key}  {variant.label}"
        if variant.run is None:
            print(f"   {title:<50} skipped: {variant.skipped}")
            continue
        if not variant.seconds:
            # Only possible for a variant run every N-th round, with fewer rounds.
            print(f"   {title:<50} no timed round (more --rounds or a lower --lightning-every)")
            continue
        per_step = statistics.median(variant.seconds) / workload.steps * 1e6
        if variant is variants[0]:
            print(f"   {title:<50} {per_step:9.1f} {1:7.3f} {'':>31}  {len(variant.seconds)}")
            continue
        spread = _paired_ratios(variant, raw)
        print(
            f"   {title:<50} {per_step:9.1f} {spread.median:7.3f} {spread.low:7.3f} "
            f"{spread.q1:7.3f} {spread.q3:7.3f} {spread.high:7.3f}  {spread.count}"
        )
        summaries.append((variant, spread))
    for variant, spread in summaries:
        print(
            f"ratio {workload.name} {variant.key}/a = {spread.median:.3f}  "
            f"(min {spread.low:.3f}, q1 {spread.q1:.3f}, q3 {spread.q3:.3f}, "
            f"max {spread.high:.3f}; {spread.count} rounds)  {variant.label}"
        )


@dataclass(frozen=True)
class Spread:
    """Summary of one variant's per-round ratios to the raw loop."""

    median: float
    low: float
    q1: float
    q3: float
    high: float
    count: int


def _paired_ratios(variant: Variant, raw: dict[int, float]) -> Spread:
    """The variant's time over the raw loop's in the same round, for every round it
    ran in: pairing cancels the slow moments a shared machine gives both alike."""
    ratios = [s / raw[r] for s, r in zip(variant.seconds, variant.rounds, strict=True)]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:  # quantiles needs two points (before Python 3.13)
        q1 = q3 = ratios[0]
    return Spread(
        median=statistics.median(ratios),
        low=min(ratios),
        q1=q1,
        q3=q3,
        high=max(ratios),
        count=len(ratios),
    )


# --------------------------------------------------------------------------------
# Start-up costs and hook-call cost
# --------------------------------------------------------------------------------


def _median_subprocess_seconds(code: str, runs: int) -> float:
    """Median of what ``code`` prints (seconds), each in a fresh interpreter."""
    values = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        values.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(values)


def _median_wall(command: list[str], runs: int) -> float:
    values = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def report_startup(runs: int) -> None:
    print("\n## start-up")
    timed_import = (
        "import time, torch\n"
        "start = time.perf_counter()\n"
        "{stmt}\n"
        "print(time.perf_counter() - start)\n"
    )
    lazy = _median_subprocess_seconds(timed_import.format(stmt="import hooktrain"), runs)
    full = _median_subprocess_seconds(
        timed_import.format(stmt="import hooktrain; hooktrain.Trainer"), runs
    )
    torch_alone = _median_subprocess_seconds(
        "import time\nstart = time.perf_counter()\nimport torch\n"
        "print(time.perf_counter() - start)\n",
        runs,
    )
    print(f"   import torch                                   {torch_alone:8.3f} s")
    print(f"   import hooktrain, after torch                  {lazy:8.3f} s")
    print(f"   import hooktrain + hooktrain.Trainer, after it {full:8.3f} s")
    cli = shutil.which("hooktrain")
    command = [cli] if cli else [sys.executable, "-m", "hooktrain"]
    listing = _median_wall([*command, "plugins"], runs)
    bare = _median_wall([sys.executable, "-c", "pass"], runs)
    leaked = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, contextlib, io\nfrom hooktrain.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['plugins'])\n"
            "print(sorted(m for m in ('torch', 'tensorboard', 'tqdm') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(
        f"   `hooktrain plugins` (whole process)            {listing:8.3f} s"
        f"   (python -c pass: {bare:.3f} s; heavy modules imported: {leaked})"
    )
    from hooktrain import Trainer

    start = time.perf_counter()
    Trainer(plugins=[], device="cpu")
    seconds = time.perf_counter() - start
    print(f"   Trainer(plugins=[]) construction               {seconds:8.4f} s")


def report_profile(workload: Workload) -> None:
    """The ``profile`` plugin's table for variant c: which plugin costs what."""
    if _missing_plugins(FIRST_PARTY):
        print("\n## profile of variant c: skipped, first-party plugins not installed")
        return
    from hooktrain import Trainer
    from hooktrain.profiling import ProfilePlugin

    print(f"\n## profile of variant c on workload {workload.name} (one more, untimed, run)")
    for _ in range(2):  # the first run warms up
        workdir = tempfile.mkdtemp(prefix="hooktrain-bench-profile-")
        profiler = ProfilePlugin(print_report=False)
        trainer = Trainer(
            plugins=[*first_party_plugins(workdir), profiler],
            max_epochs=workload.epochs,
            device="cpu",
        )
        try:
            with quiet():
                trainer.fit(
                    workload.make_model(),
                    workload.make_data(),
                    loss_fn=workload.loss_fn,
                    optimizer=_sgd(workload),
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(profiler.report.format(limit=14))


def report_hook_cost(calls: int) -> None:
    """What one hook call costs the loop with 0, 1 and 5 implementations, measured
    the way the loop calls it (hooks resolved once per stage)."""
    from hooktrain import Trainer, hookimpl
    from hooktrain.hookcalls import ResolvedHooks as _ResolvedHooks

    class Noop:
        def __init__(self, index: int) -> None:
            self.name = f"noop{index}"

        @hookimpl
        def on_train_batch_end(
            self, trainer: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            pass

    print("\n## one hook call inside the loop (on_train_batch_end)")
    for count in (0, 1, 5):
        trainer = Trainer(plugins=[Noop(i) for i in range(count)], device="cpu")
        hook = _ResolvedHooks(trainer.plugin_manager, trainer._defaults).on_train_batch_end
        # The loop's own statement: skip the call when nothing implements the hook.
        namespace = {"hook": hook, "trainer": trainer, "batch": None}
        statement = (
            "if hook is not None:\n"
            "    hook(trainer=trainer, outputs=None, batch=batch, batch_idx=0)"
        )
        best = min(timeit.repeat(statement, globals=namespace, number=calls, repeat=5))
        print(f"   {count} implementation(s): {best / calls * 1e6:6.2f} us per call")


def report_calls_per_step(factory: Callable[[int, int], Workload], variants: list[Variant]) -> None:
    """Function calls per training step that each variant makes beyond the raw loop.

    Counted, not timed, so a busy machine cannot move it: ``sys.setprofile`` sees
    every call into Python code and into C functions and methods (each torch
    operator call from Python is one). Each variant runs twice, with a short and a
    long epoch; the difference divided by the extra steps is its marginal count per
    step, free of what ``fit`` does once (setup, plugin loading, checkpoints at the
    epoch's end). The count says how much work is added, not what it costs: a call
    into Python takes tens of nanoseconds, a torch operator microseconds.
    """
    short, long = 10, 40
    print(f"\n## calls per training step, marginal ({short} vs {long} steps, sys.setprofile)")

    def calls(variant: Variant, steps: int) -> int:
        sized = factory(steps, 1)
        model, data = sized.make_model(), sized.make_data()
        workdir = tempfile.mkdtemp(prefix="hooktrain-bench-calls-")
        seen = [0]

        def profiler(frame: Any, event: str, arg: Any) -> None:
            if event == "call" or event == "c_call":
                seen[0] += 1

        try:
            with quiet():
                sys.setprofile(profiler)
                try:
                    variant.run(sized, model, data, workdir)
                finally:
                    sys.setprofile(None)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return seen[0]

    raw = None
    for variant in variants:
        if variant.run is None or variant.key not in "abc":
            continue
        calls(variant, short)  # imports and first-call caches out of the count
        per_step = (calls(variant, long) - calls(variant, short)) / (long - short)
        raw = per_step if raw is None else raw
        print(f"   {variant.key}  {variant.label:<45} {per_step:7.1f}  ({per_step - raw:+.1f})")


# --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and two rounds: checks the script, measures nothing",
    )
    parser.add_argument(
        "--rounds",
        "--repeats",
        dest="rounds",
        type=int,
        default=101,
        help="timed interleaved rounds of a, b and c, after one warm-up round (the "
        "budgeted ratios; on a shared machine the median of about 30 rounds still moves "
        "by 2%%); a few, e.g. --rounds 3, check the script in seconds",
    )
    parser.add_argument(
        "--lightning-every",
        type=int,
        default=4,
        help="run the Lightning variants d and e in every N-th round only (they take "
        "most of a round's time)",
    )
    parser.add_argument("--mlp-steps", type=int, default=300, help="MLP steps per epoch")
    parser.add_argument(
        "--conv-steps",
        type=int,
        default=0,
        help="CNN steps per epoch (0: the whole training set, 45)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--workloads", default="mlp,conv", help="comma-separated: mlp,conv")
    parser.add_argument("--no-lightning", action="store_true", help="skip variants d and e")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print the profile plugin's table for variant c on the MLP",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (steadier on a "
        "shared machine, blind to time spent waiting on other threads)",
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.rounds, options.mlp_steps, options.conv_steps = 2, 20, 4
        options.lightning_every = 1
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    if options.lightning_every < 1:
        parser.error("--lightning-every must be at least 1")

    torch.set_num_threads(options.threads)
    global CLOCK
    CLOCK = time.perf_counter if options.clock == "wall" else time.process_time
    print(f"# hooktrain benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"   python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}, "
        f"clock {options.clock}"
    )
    try:
        import lightning

        print(f"   lightning {lightning.__version__}")
    except ImportError:
        pass

    factories = {
        "mlp": (mlp_workload, options.mlp_steps),
        "conv": (conv_workload, options.conv_steps),
    }
    for name in options.workloads.split(","):
        factory, steps = factories[name.strip()]
        workload = factory(steps, options.epochs)
        variants = make_variants(not options.no_lightning, options.lightning_every)
        time_workload(workload, variants, options.rounds)
        report_workload(workload, variants, options.rounds)
        report_calls_per_step(factory, variants)

    if options.profile:
        report_profile(factories["mlp"][0](options.mlp_steps, options.epochs))
    report_startup(runs=1 if options.quick else 7)
    report_hook_cost(calls=2_000 if options.quick else 200_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
