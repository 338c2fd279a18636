"""digits: a small CNN on scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline).

Run it (default experiment, 2 CPU workers, DDP over gloo)::

    python -m forge                                  # same as experiment=digits
    python -m forge recipe.params.channels=32 trainer.max_steps=400
    python -m forge scaling.num_workers=1 optim.lr=3e-3

Supports every forge strategy (``strategy=...``), precision ``32``/``bf16``, resume and export.
Copy this file to start your own forge-loop recipe: define ``Params`` and ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

import forge

# Params a PBT sweep may change between segments of one run (the model's shapes stay the same;
# dropout is rebuilt from the new value when a trial continues from another's checkpoint).
PBT_MUTABLE_PARAMS = ("dropout",)


@dataclass
class Params:
    """Knobs for this recipe; set them as ``recipe.params.<name>=...``."""

    channels: int = 16  # width of the first conv layer; the second has twice as many
    dropout: float = 0.1
    val_fraction: float = 0.2  # held out from the 1,797 images, same split on every worker
    split_seed: int = 0  # fixed so train/val never mix across runs with different seeds


class DigitsCNN(nn.Module):
    """Two conv blocks and a linear head for 1x8x8 images."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * channels * 16, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_tensors(
    val_fraction: float, split_seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """The digits images as float tensors in [0, 1], split into train and validation sets."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def eval_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return {
        "loss": nn.functional.cross_entropy(logits, labels, reduction="none"),
        "accuracy": (logits.argmax(dim=1) == labels).float(),
    }


def train_size(params: Params) -> int:
    """Training samples for ``params``, without loading data: forge checks ``data.batch_size``
    against it on the driver, before any worker starts (the split below keeps 1,797 images minus the
    validation share)."""
    return 1797 - int(1797 * params.val_fraction)


def train_data(params: Params) -> TensorDataset:
    """The training split alone: forge profiles and fingerprints it on the driver, which
    then never builds the model."""
    return load_digits_tensors(params.val_fraction, params.split_seed)[0]


def build(params: Params) -> forge.Recipe:
    """Build the model and data; forge calls this once on every worker."""
    train_data, val_data = load_digits_tensors(params.val_fraction, params.split_seed)
    return forge.Recipe(
        model=DigitsCNN(params.channels, params.dropout),
        train_data=train_data,
        val_data=val_data,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        export=export_spec(val_data),
    )


def export_spec(val_data: TensorDataset) -> forge.ExportSpec:
    """What the served model takes: a batch of images, any batch size; for ``forge export``."""
    images = val_data.tensors[0]
    return forge.ExportSpec(
        input_names=("images",),
        output_names=("logits",),
        example=lambda n: (forge.ExportSpec.rows(images, n),),
        dynamic_dims={"images": {0: "batch"}},
        task="classification",
        preprocessing="8x8 grayscale images as float32 (N, 1, 8, 8) in [0, 1]: scikit-learn's "
        "0..16 pixel values divided by 16. The logits' argmax is the digit.",
    )
