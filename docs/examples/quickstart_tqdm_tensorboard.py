"""The progress bar and TensorBoard on scikit-learn's digits (bundled, no download).

Runs in a few seconds on a CPU; writes its event files under ./runs/quickstart/.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hooktrain

digits = load_digits()
inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
targets = torch.tensor(digits.target)
train_loader = DataLoader(TensorDataset(inputs[:1500], targets[:1500]), batch_size=64, shuffle=True)
val_loader = DataLoader(TensorDataset(inputs[1500:], targets[1500:]), batch_size=256)

# --8<-- [start:fit]
trainer = hooktrain.Trainer(
    plugins=[
        ("tqdm", {"refresh_interval": 0.2}),
        ("tensorboard", {"log_dir": "runs", "name": "quickstart"}),
    ],
    max_epochs=3,
    log_every_n_steps=10,
    seed=0,
)
trainer.fit(
    nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    metrics={"acc": hooktrain.accuracy},
)
# --8<-- [end:fit]

# --8<-- [start:read]
run_dir = trainer.plugin_manager.get_plugin("tensorboard").run_dir
events = EventAccumulator(str(run_dir))
events.Reload()
val_acc = [(e.step, round(e.value, 3)) for e in events.Scalars("val/acc")]
print(run_dir, sorted(events.Tags()["scalars"]), val_acc)
# --8<-- [end:read]

assert [step for step, _ in val_acc] == [24, 48, 72]
assert val_acc[-1][1] > 0.8
