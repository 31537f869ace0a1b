"""The main demo: a small convolutional network on the digits, Lightning style (the model
defines its steps), with the progress bar, TensorBoard and checkpoint plugins.

    python examples/convolutional.py            # trains, writes runs/ and checkpoints/
    python examples/convolutional.py --resume   # continues from the last checkpoint
"""

PLUGINS = [
    "tqdm",
    ("tensorboard", {"log_dir": "runs", "name": "convolutional"}),
    (
        "checkpoint",
        {
            "dirpath": "checkpoints/convolutional",
            "every_n_epochs": 1,
            "monitor": "val_acc",
            "mode": "max",
            "save_top_k": 2,
        },
    ),
]

import argparse  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from digits_data import digits_loaders  # noqa: E402
from torch import nn  # noqa: E402

import hooktrain  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Dropout(0.2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        # Every scalar in the returned dict becomes a metric: val_loss, val_acc.
        return {"loss": F.cross_entropy(logits, labels), "acc": hooktrain.accuracy(logits, labels)}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args()

    hooktrain.seed_everything(0)
    train_loader, val_loader = digits_loaders(batch_size=32)
    model = DigitsCNN()
    trainer = hooktrain.Trainer(plugins=PLUGINS, max_epochs=args.epochs, seed=0)
    trainer.fit(model, train_loader, val_loader, ckpt_path="last" if args.resume else None)
    if trainer.interrupted:  # a SIGTERM stopped the run after saving
        print("stopped; run again with --resume to continue", file=sys.stderr)
        sys.exit(143)  # tell a scheduler the job is not done (128 + SIGTERM)
    m = trainer.metrics
    print(f"final: val_loss={m['val_loss']:.4f} val_acc={m['val_acc']:.4f}")


if __name__ == "__main__":
    main()
