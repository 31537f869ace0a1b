"""scikit-learn's bundled 8x8 digits (no download), split 80/20 with a fixed seed."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of images shaped (1, 8, 8), scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    train_x, val_x, train_y, val_y = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )

    def dataset(x, y):
        inputs = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return TensorDataset(inputs, torch.tensor(y, dtype=torch.long))

    return (
        DataLoader(dataset(train_x, train_y), batch_size=batch_size, shuffle=True),
        DataLoader(dataset(val_x, val_y), batch_size=256),
    )
