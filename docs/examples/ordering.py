"""Call order: list order, tryfirst/trylast, wrappers, and replacing a computation."""

import time

import torch
import torch.nn.functional as F

from hooktrain import Trainer, hookimpl
from hooktrain.testing import make_data, make_model

calls = []


# --8<-- [start:order]
class First:
    @hookimpl
    def on_train_epoch_end(self, trainer):
        calls.append("First")


class Second:
    @hookimpl
    def on_train_epoch_end(self, trainer):
        calls.append("Second")


class Eager:
    @hookimpl(tryfirst=True)  # before every plain implementation, wherever it is listed
    def on_train_epoch_end(self, trainer):
        calls.append("Eager")


class Late:
    @hookimpl(trylast=True)  # after every plain implementation (the core's defaults still later)
    def on_train_epoch_end(self, trainer):
        calls.append("Late")


class Later:
    @hookimpl(trylast=True)  # trylast among trylast: reverse list order, so before Late
    def on_train_epoch_end(self, trainer):
        calls.append("Later")


trainer = Trainer(plugins=[Late(), First(), Second(), Eager(), Later()], max_epochs=1)
# on_train_epoch_end runs: Eager, First, Second, Later, Late
# --8<-- [end:order]


# --8<-- [start:wrapper]
class TimeForward:
    """Surrounds every forward step: code before ``yield`` runs before the others,
    code after it sees their result (or their exception, raised at the yield)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @hookimpl(wrapper=True)
    def forward_step(self, trainer, stage):
        start = time.perf_counter()
        try:
            return (yield)  # the other implementations run here
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


# --8<-- [end:wrapper]


# --8<-- [start:replace]
class LabelSmoothing:
    """Takes over the training forward step: returning a value stops the call
    (``firstresult``), so the core's default never runs. Returning None defers."""

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing

    @hookimpl
    def forward_step(self, trainer, batch, stage):
        if stage != "train":
            return None  # validation keeps the default step
        inputs, targets = batch
        logits = trainer.model(inputs)
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


# --8<-- [end:replace]


train_loader, val_loader = make_data()
trainer.fit(
    make_model(),
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
print("on_train_epoch_end order:", calls)
assert calls == ["Eager", "First", "Second", "Later", "Late"]

timer, smoothing = TimeForward(), LabelSmoothing(0.2)
trainer = Trainer(plugins=[timer, smoothing], max_epochs=1)
trainer.fit(
    make_model(),
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
print(f"{timer.calls} forward steps took {timer.seconds * 1e3:.1f} ms in all")
# Counted, not timed: how long they took depends on the machine. The wrapper
# surrounds every forward step, the ones LabelSmoothing takes over included.
assert timer.calls == len(train_loader) + len(val_loader)
