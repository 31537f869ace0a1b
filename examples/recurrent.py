"""A recurrent network (GRU) that reads each digit image row by row: 8 steps of 8 pixels."""

PLUGINS = ["tqdm"]

import argparse  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from digits_data import digits_loaders  # noqa: E402
from torch import nn  # noqa: E402

import hooktrain  # noqa: E402


class RowGRU(nn.Module):
    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.reshape(-1, 8, 8)  # (batch, time = rows, features = pixels)
        _, last_hidden = self.gru(rows)
        return self.head(last_hidden[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()

    hooktrain.seed_everything(0)
    train_loader, val_loader = digits_loaders(batch_size=32)
    model = RowGRU()
    trainer = hooktrain.Trainer(
        plugins=PLUGINS, max_epochs=args.epochs, seed=0, gradient_clip_val=1.0
    )
    trainer.fit(
        model,
        train_loader,
        val_loader,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        metrics={"acc": hooktrain.accuracy},
    )
    m = trainer.metrics
    print(f"final: val_loss={m['val_loss']:.4f} val_acc={m['val_acc']:.4f}")


if __name__ == "__main__":
    main()
