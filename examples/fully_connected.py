"""A fully connected network on the digits, Keras style: a plain module, loss_fn and optimizer."""

PLUGINS = ["tqdm"]

import argparse  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from digits_data import digits_loaders  # noqa: E402
from torch import nn  # noqa: E402

import hooktrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    hooktrain.seed_everything(0)
    train_loader, val_loader = digits_loaders(batch_size=32)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 10),
    )
    trainer = hooktrain.Trainer(plugins=PLUGINS, max_epochs=args.epochs, seed=0)
    trainer.fit(
        model,
        train_loader,
        val_loader,
        loss_fn=F.cross_entropy,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        metrics={"acc": hooktrain.accuracy},
    )
    m = trainer.metrics
    print(f"final: val_loss={m['val_loss']:.4f} val_acc={m['val_acc']:.4f}")


if __name__ == "__main__":
    main()
