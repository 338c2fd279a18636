"""lightning_digits: the digits CNN written as ordinary PyTorch Lightning code, run by forge.

This is the *Lightning path*: ``DigitsModule`` and ``DigitsDataModule`` are plain Lightning
classes with no forge imports, exactly what an existing Lightning project already has. forge only
needs ``Params`` and ``build_lightning``; it runs the module under Ray's Lightning strategies.
``export_spec`` (optional) says what the module takes when served, for ``forge export``.

Run it::

    python -m forge recipe=lightning_digits
    python -m forge recipe=lightning_digits recipe.params.lr=3e-3 recipe.params.batch_size=128

The optimizer is the module's own (``configure_optimizers``), so set the learning rate with
``recipe.params.lr``, not ``optim.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import forge
from recipes.digits import DigitsCNN, load_digits_tensors
from recipes.digits import export_spec as digits_export_spec


@dataclass
class Params:
    """Knobs for this recipe; set them as ``recipe.params.<name>=...``."""

    channels: int = 16  # width of the first conv layer; the second has twice as many
    dropout: float = 0.1
    lr: float = 1e-3
    batch_size: int = 64  # per device
    val_fraction: float = 0.2  # held out from the 1,797 images, same split on every worker
    split_seed: int = 0  # fixed so train/val never mix across runs with different seeds


class DigitsModule(pl.LightningModule):
    """A LightningModule around :class:`recipes.digits.DigitsCNN`."""

    def __init__(self, channels: int = 16, dropout: float = 0.1, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsCNN(channels, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        # sync_dist averages across devices, so every rank logs the global value.
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/accuracy", (logits.argmax(dim=1) == labels).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class DigitsDataModule(pl.LightningDataModule):
    """The digits train/validation split as Lightning dataloaders."""

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        # Loaded in setup, which runs on every device: the data is small and the split seeded.
        self.train_set, self.val_set = load_digits_tensors(self.val_fraction, self.split_seed)

    def train_dataloader(self) -> DataLoader:
        # Under a distributed strategy Lightning swaps in a DistributedSampler by itself.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def export_spec(params: Params) -> forge.ExportSpec:
    """What the served module takes (``forge export``); the same images as recipes.digits."""
    _, val_data = load_digits_tensors(params.val_fraction, params.split_seed)
    return digits_export_spec(val_data)


def train_data(params: Params) -> TensorDataset:
    """The training split alone (forge profiles it on the driver, without a module)."""
    return load_digits_tensors(params.val_fraction, params.split_seed)[0]


def build_lightning(params: Params) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Build the module and data; forge calls this on every worker."""
    module = DigitsModule(params.channels, params.dropout, params.lr)
    data = DigitsDataModule(params.batch_size, params.val_fraction, params.split_seed)
    return module, data
