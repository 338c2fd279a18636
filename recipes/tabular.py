"""tabular: an MLP classifier on scikit-learn's bundled breast-cancer data (569 rows x 30
features, offline).

Run it::

    python -m forge recipe=tabular
    python -m forge recipe=tabular recipe.params.hidden=128 recipe.params.depth=3

Or on your own table (Parquet/CSV, local or s3://; see scripts/make_tabular_data.py)::

    python -m forge experiment=tabular data.source=data/loans data.label=default \
        data.val_fraction=0.1

With a file source numeric columns are fed raw (a null becomes the training mean) and text
columns one-hot over the categories seen in training; the label's classes are the sorted
distinct values of ``data.label``.

The model takes *raw* features: the standardisation (mean/std of the training split) lives in the
model as buffers, so an exported model serves raw rows and drift checks compare raw values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import TensorDataset

import forge

if TYPE_CHECKING:
    from forge.data.prepare import TableInfo

# The columns in order, spelled as scikit-learn spells them. Written out rather than read from
# sklearn so the schema is visible here and importing the module stays cheap.
FEATURE_NAMES: list[str] = [
    "mean radius",
    "mean texture",
    "mean perimeter",
    "mean area",
    "mean smoothness",
    "mean compactness",
    "mean concavity",
    "mean concave points",
    "mean symmetry",
    "mean fractal dimension",
    "radius error",
    "texture error",
    "perimeter error",
    "area error",
    "smoothness error",
    "compactness error",
    "concavity error",
    "concave points error",
    "symmetry error",
    "fractal dimension error",
    "worst radius",
    "worst texture",
    "worst perimeter",
    "worst area",
    "worst smoothness",
    "worst compactness",
    "worst concavity",
    "worst concave points",
    "worst symmetry",
    "worst fractal dimension",
]
NUM_CLASSES = 2  # 0 = malignant, 1 = benign


@dataclass
class Params:
    """Knobs for this recipe; set them as ``recipe.params.<name>=...``."""

    hidden: int = 64  # width of every hidden layer
    depth: int = 2  # number of hidden layers
    dropout: float = 0.1
    val_fraction: float = 0.2  # held out from the 569 rows, same split on every worker
    split_seed: int = 0  # fixed so train/val never mix across runs with different seeds


def load_frame() -> tuple[torch.Tensor, torch.Tensor]:
    """The full dataset: features ``(569, 30)`` float32 in :data:`FEATURE_NAMES` order, and
    labels ``(569,)`` int64."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = torch.tensor(data.data, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    return features, labels


class TabularMLP(nn.Module):
    """Standardise raw features with stored statistics, then an MLP to class logits."""

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        hidden: int,
        depth: int,
        dropout: float,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        # Buffers, not parameters: saved in the state dict and moved with the model, never trained.
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(1e-6))  # a constant column must not divide by 0
        layers: list[nn.Module] = []
        width = len(mean)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A null (NaN) feature becomes 0 after standardising: the training mean.
        return self.net(torch.nan_to_num((x - self.mean) / self.std, nan=0.0))


def split(
    features: torch.Tensor, labels: torch.Tensor, val_fraction: float, split_seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """A seeded random split into train and validation sets."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(features[train], labels[train]), TensorDataset(features[val], labels[val])


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    features, labels = batch
    return nn.functional.cross_entropy(model(features), labels)


def eval_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    features, labels = batch
    logits = model(features)
    return {
        "loss": nn.functional.cross_entropy(logits, labels, reduction="none"),
        "accuracy": (logits.argmax(dim=1) == labels).float(),
    }


def train_size(params: Params) -> int:
    """Training samples for ``params``, without loading data: forge checks ``data.batch_size``
    against it on the driver, before any worker starts (the split below keeps 569 rows minus the
    validation share)."""
    return 569 - int(569 * params.val_fraction)


def train_data(params: Params) -> TensorDataset:
    """The bundled training split alone (forge profiles it on the driver, without a model;
    a file source is profiled by forge itself)."""
    return split(*load_frame(), params.val_fraction, params.split_seed)[0]


def build(params: Params, data: TableInfo | None = None) -> forge.Recipe:
    """Build the model and data; forge calls this once on every worker.

    ``data`` is a checked file source (``data.source=...``): forge streams its rows to this
    worker and turns each batch into ``(features, labels)`` with ``data.encode``; the model's
    standardisation comes from the training profile's means and standard deviations.
    """
    if data is not None:
        mean, std = data.feature_stats()
        model = TabularMLP(
            torch.from_numpy(mean),
            torch.from_numpy(std),
            params.hidden,
            params.depth,
            params.dropout,
            num_classes=len(data.classes),
        )
        # Export examples: seeded rows around the training means (parity needs real-looking
        # inputs, and the file source's rows live on the workers' Ray Data shards).
        g = torch.Generator().manual_seed(0)
        example = torch.from_numpy(mean) + torch.from_numpy(std) * torch.randn(
            64, len(mean), generator=g
        )
        return forge.Recipe(
            model=model,
            train_data=None,
            loss_fn=loss_fn,
            eval_fn=eval_fn,
            export=export_spec(example, width=data.width),
        )
    train_data, val_data = split(*load_frame(), params.val_fraction, params.split_seed)
    # Statistics from the training split only, so nothing about validation leaks into the model.
    train_features = train_data.tensors[0]
    model = TabularMLP(
        train_features.mean(dim=0),
        train_features.std(dim=0),
        params.hidden,
        params.depth,
        params.dropout,
    )
    return forge.Recipe(
        model=model,
        train_data=train_data,
        val_data=val_data,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        export=export_spec(val_data.tensors[0]),
    )


def export_spec(val_features: torch.Tensor, width: int = len(FEATURE_NAMES)) -> forge.ExportSpec:
    """What the served model takes: raw feature rows, any batch size; for ``forge export``."""
    return forge.ExportSpec(
        input_names=("features",),
        output_names=("logits",),
        example=lambda n: (forge.ExportSpec.rows(val_features, n),),
        dynamic_dims={"features": {0: "batch"}},
        task="classification",
        preprocessing=f"None: raw float32 rows (N, {width}) in feature order. "
        "Standardization is inside the model (training-split mean/std as buffers). "
        "Argmax 0 = malignant, 1 = benign.",
    )
