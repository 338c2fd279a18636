"""Unit tests for the shipped recipes: they build, learn, evaluate, and match their configs.

No Ray here: each recipe's pieces are driven directly with a plain optimizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from forge.recipe import build_params, import_recipe_module
from recipes import digits, tabular, tinylm

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipe"
TINY_LM = tinylm.Params(
    n_layer=1, n_head=2, n_embd=32, block_size=32, max_files=3, val_fraction=0.1
)


def first_batches(dataset, batch_size: int, n: int) -> list:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return [batch for batch, _ in zip(loader, range(n), strict=False)]


def train_steps(recipe, batches: list, steps: int, lr: float) -> tuple[float, float]:
    """Loss on ``batches`` before and after ``steps`` passes of AdamW over them."""
    torch.manual_seed(0)
    model = recipe.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def total_loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(recipe.loss_fn(model, b)) for b in batches) / len(batches)

    before = total_loss()
    model.train()
    for _ in range(steps):
        for batch in batches:
            optimizer.zero_grad()
            recipe.loss_fn(model, batch).backward()
            optimizer.step()
    return before, total_loss()


# --------------------------------------------------------------------------------------------
# forge-loop recipes


@pytest.mark.parametrize(
    ("module", "params", "lr"),
    [
        (digits, digits.Params(), 1e-2),
        (tinylm, TINY_LM, 3e-3),
        (tabular, tabular.Params(), 1e-2),
    ],
    ids=["digits", "tinylm", "tabular"],
)
def test_recipe_builds_and_learns(module, params, lr) -> None:
    torch.manual_seed(0)
    recipe = module.build(params)
    assert len(recipe.train_data) > 0 and len(recipe.val_data) > 0
    before, after = train_steps(recipe, first_batches(recipe.train_data, 16, 2), steps=5, lr=lr)
    assert after < before


@pytest.mark.parametrize(
    ("module", "params", "values_per_example"),
    [
        (digits, digits.Params(), 1),
        (tinylm, TINY_LM, TINY_LM.block_size),  # one loss per token
        (tabular, tabular.Params(), 1),
    ],
    ids=["digits", "tinylm", "tabular"],
)
def test_eval_fn_returns_per_example_values(module, params, values_per_example) -> None:
    recipe = module.build(params)
    batch = first_batches(recipe.val_data, 5, 1)[0]
    model = recipe.build_model()
    model.eval()
    with torch.no_grad():
        metrics = recipe.eval_fn(model, batch)
    assert "loss" in metrics
    for name, values in metrics.items():
        assert values.shape == (5 * values_per_example,), name
        assert torch.isfinite(values).all(), name


def test_tinylm_windows_are_shifted_by_one() -> None:
    recipe = tinylm.build(TINY_LM)
    x, y = recipe.train_data[3]
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (TINY_LM.block_size,)
    assert torch.equal(x[1:], y[:-1])
    # Consecutive windows tile the corpus: the next window starts where this one's targets end.
    x_next, _ = recipe.train_data[4]
    assert x_next[0] == y[-1]


def test_tinylm_split_is_by_position_and_sized() -> None:
    data = tinylm.load_corpus(max_files=3)
    train, val = tinylm.split_corpus(data, block_size=32, val_fraction=0.1)
    n_train = len(data) - int(len(data) * 0.1)
    assert len(train) == (n_train - 1) // 32
    assert len(val) == (len(data) - n_train - 1) // 32
    assert torch.equal(val.data, data[n_train:])
    with pytest.raises(IndexError):
        train[len(train)]


def test_tinylm_rejects_too_little_data() -> None:
    import forge

    with pytest.raises(forge.ConfigError, match="block_size"):
        tinylm.build(dataclasses.replace(TINY_LM, max_files=1, val_fraction=0.001))


def test_tinylm_param_count_and_flops() -> None:
    model = tinylm.TinyLM(TINY_LM)
    n = tinylm.num_params(model)
    assert model.head.weight is model.tok_emb.weight  # tied, so counted once
    state_numel = sum(t.numel() for t in model.state_dict().values())  # lists the tie twice
    assert n == state_numel - model.head.weight.numel()
    expected = 6 * n + 12 * TINY_LM.n_layer * TINY_LM.n_embd * TINY_LM.block_size
    assert tinylm.flops_per_token(TINY_LM, n) == expected


def test_tabular_standardization_uses_train_split_only() -> None:
    params = tabular.Params()
    recipe = tabular.build(params)
    train_x = recipe.train_data.tensors[0]
    assert torch.allclose(recipe.model.mean, train_x.mean(dim=0))
    assert torch.allclose(recipe.model.std, train_x.std(dim=0))
    full_x, _ = tabular.load_frame()
    assert not torch.allclose(recipe.model.mean, full_x.mean(dim=0))
    # Buffers travel in the state dict, so an exported model standardises raw rows by itself.
    assert {"mean", "std"} <= set(recipe.model.state_dict())


def test_tabular_frame_and_feature_names() -> None:
    from sklearn.datasets import load_breast_cancer

    features, labels = tabular.load_frame()
    assert features.shape == (569, 30) and features.dtype == torch.float32
    assert labels.shape == (569,)
    assert tabular.FEATURE_NAMES == list(load_breast_cancer().feature_names)


# --------------------------------------------------------------------------------------------
# Lightning recipe


def test_lightning_digits_trains() -> None:
    import pytorch_lightning as pl

    from recipes import lightning_digits

    module, data = lightning_digits.build_lightning(lightning_digits.Params(batch_size=32))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert "train/loss" in trainer.callback_metrics
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert set(metrics) == {"val/loss", "val/accuracy"}


def test_lightning_classes_do_not_import_forge() -> None:
    import inspect

    from recipes import lightning_digits

    for cls in (lightning_digits.DigitsModule, lightning_digits.DigitsDataModule):
        assert "forge" not in inspect.getsource(cls)


# --------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_config_matches_params(path: Path) -> None:
    assert path.read_text().startswith("# @package recipe\n")
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    mod = import_recipe_module(cfg.module)
    assert hasattr(mod, "build_lightning" if cfg.kind == "lightning" else "build")

    values = OmegaConf.to_container(cfg.params)
    fields = {f.name: f.default for f in dataclasses.fields(mod.Params)}
    assert list(values) == list(fields)  # every field, in declaration order
    build_params(mod, values)  # types check out
    if cfg.name == cfg.module.rsplit(".", 1)[-1]:  # the recipe's own config shows its defaults
        assert values == fields


def test_every_recipe_has_a_config() -> None:
    modules = {OmegaConf.load(p).module for p in CONFIG_DIR.glob("*.yaml")}
    shipped = {f"recipes.{p.stem}" for p in CONFIG_DIR.parents[1].joinpath("recipes").glob("*.py")}
    assert shipped - {"recipes.__init__"} <= modules
