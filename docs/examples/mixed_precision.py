"""bf16 autocast on the CPU with the amp plugin, and a look inside the model."""

import torch
import torch.nn.functional as F
from torch import nn

import hooktrain
from hooktrain.testing import make_data


# --8<-- [start:model]
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 32)
        self.out = nn.Linear(32, 2)
        self.hidden_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        self.hidden_dtype = h.dtype  # what autocast made of the first layer
        return self.out(torch.relu(h))


# --8<-- [end:model]

# --8<-- [start:fit]
trainer = hooktrain.Trainer(
    plugins=[("amp", {"precision": "bf16"})], device="cpu", max_epochs=2, seed=0
)
train, val = make_data(n=256, batch_size=32)
model = Net()
trainer.fit(
    model,
    train,
    val,
    loss_fn=F.cross_entropy,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
print(f"activations: {model.hidden_dtype}, weights: {model.hidden.weight.dtype}")
# --8<-- [end:fit]
