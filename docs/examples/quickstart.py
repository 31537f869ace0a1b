"""Getting started: train a small network on scikit-learn's digits (bundled, no download)."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hooktrain

# --8<-- [start:data]
digits = load_digits()
inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
targets = torch.tensor(digits.target)
train = TensorDataset(inputs[:1500], targets[:1500])
val = TensorDataset(inputs[1500:], targets[1500:])
train_loader = DataLoader(train, batch_size=64, shuffle=True)
val_loader = DataLoader(val, batch_size=256)
# --8<-- [end:data]

# --8<-- [start:fit]
hooktrain.seed_everything(0)  # the model's initial weights, drawn before fit starts
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

trainer = hooktrain.Trainer(
    plugins=[("early_stopping", {"monitor": "val_loss", "patience": 2})],
    max_epochs=5,
    seed=0,
)
trainer.fit(
    model,
    train_loader,
    val_loader,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    metrics={"acc": hooktrain.accuracy},
)
# current_epoch counts from 0, and is the last epoch's after fit.
print(f"{trainer.current_epoch + 1} epochs: val_acc={trainer.metrics['val_acc']:.3f}")
# --8<-- [end:fit]

# --8<-- [start:evaluate]
scores = trainer.test(
    model, val_loader, loss_fn=F.cross_entropy, metrics={"acc": hooktrain.accuracy}
)
predictions = trainer.predict(model, val_loader)
print(sorted(scores), tuple(predictions.shape))
# --8<-- [end:evaluate]

assert trainer.metrics["val_acc"] > 0.8
assert tuple(predictions.shape) == (297, 10)
