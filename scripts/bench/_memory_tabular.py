"""The in-memory side of ``data_ingest.py``: the ``tabular`` recipe's model on the same Parquet
rows, read and encoded once into tensors (forge's in-memory ``DataLoader`` path feeds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

import forge
from forge.checkpoint.storage import StorageOptions
from forge.config.specs import DataSpec
from forge.data.prepare import prepare_files
from forge.data.source import read_batches
from recipes.tabular import Params as TabularParams
from recipes.tabular import TabularMLP, eval_fn, loss_fn


@dataclass
class Params:
    source: str = ""
    columns: list[str] = field(default_factory=list)


def build(params: Params) -> forge.Recipe:
    spec = DataSpec(source=params.source, label="default", columns=params.columns)
    table = prepare_files(spec, StorageOptions(), check_batches=False).table
    xs, ys = zip(*(table.encode(frame) for frame in read_batches(table.source)), strict=True)
    mean, std = table.feature_stats()
    p = TabularParams()
    model = TabularMLP(
        torch.from_numpy(mean),
        torch.from_numpy(std),
        p.hidden,
        p.depth,
        p.dropout,
        num_classes=len(table.classes),
    )
    return forge.Recipe(
        model=model,
        train_data=TensorDataset(torch.cat(xs), torch.cat(ys)),
        loss_fn=loss_fn,
        eval_fn=eval_fn,
    )
