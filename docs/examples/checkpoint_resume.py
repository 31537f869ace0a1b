"""Checkpointing and resuming: one command that can be rerun after every crash."""

import sys

import hooktrain_checkpoint.cli
import torch
import torch.nn.functional as F
from hooktrain_checkpoint import ModelCheckpoint
from torch import nn

import hooktrain
from hooktrain.testing import make_data


# --8<-- [start:train]
def train(max_epochs: int) -> tuple[hooktrain.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(
        dirpath="checkpoints",
        every_n_train_steps=5,  # last.ckpt mid-epoch too; resumes at the exact batch
        every_n_epochs=1,  # and after each epoch's validation, ranked by it
        monitor="val_loss",
        mode="min",
        save_top_k=2,  # the two best by val_loss, plus last.ckpt
        filename="{epoch}-{step}-{val_loss:.3f}",
    )
    trainer = hooktrain.Trainer(plugins=[checkpoint], max_epochs=max_epochs, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    train_loader, val_loader = make_data()  # a shuffled DataLoader
    trainer.fit(
        model,
        train_loader,
        val_loader,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
        ckpt_path="last",  # the newest intact checkpoint, or a fresh start
    )
    return trainer, checkpoint


# --8<-- [end:train]


# --8<-- [start:run]
trainer, checkpoint = train(max_epochs=2)  # "no complete checkpoint ...; starting fresh"
print("best:", checkpoint.best_model_path.name, "last:", checkpoint.last_path.name)
trainer, checkpoint = train(max_epochs=3)  # resumes after epoch 1 (counted from 0): trains epoch 2
# --8<-- [end:run]

# --8<-- [start:sigterm]
if checkpoint.interrupted:  # a SIGTERM stopped the run after saving
    sys.exit(143)  # tell the scheduler the job is not done (128 + SIGTERM)
# --8<-- [end:sigterm]

# --8<-- [start:inspect]
hooktrain_checkpoint.cli.main(["checkpoints/last.ckpt"])  # the same as: hooktrain checkpoint ...
# --8<-- [end:inspect]
