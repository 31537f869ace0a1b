"""A model that defines its own steps and optimizers; the trainer calls them."""

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import Trainer
from hooktrain.testing import make_data


# --8<-- [start:model]
class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self(inputs)
        # "loss" becomes val_loss (as would any other number, as val_<key>); with
        # "outputs" and "targets" the trainer also computes metrics= on them.
        return {"loss": F.cross_entropy(logits, targets), "outputs": logits, "targets": targets}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


train_loader, val_loader = make_data()
trainer = Trainer(plugins=[], max_epochs=3, seed=0)
trainer.fit(Classifier(), train_loader, val_loader)
print(trainer.metrics.floats(["loss", "val_loss"]))
# --8<-- [end:model]

assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**3
