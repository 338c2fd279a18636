"""The Lightning path end to end: an unchanged LightningModule trained by forge.train on Ray.

Runs on the shared local Ray cluster (``ray_cluster`` in tests/conftest.py), with 2 workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import forge
from forge.metrics import read_metrics

pytestmark = pytest.mark.ray

LIGHTNING = [
    "experiment=lightning_digits",
    "checkpoint.every_n_steps=10",
    "trainer.val_every_n_steps=10",
]


def overrides(ray_cluster: str, tmp_path: Path, *extra: str) -> list[str]:
    return [f"ray.address={ray_cluster}", f"storage.uri={tmp_path}", *LIGHTNING, *extra]


def committed_steps(run_dir: str) -> list[int]:
    folders = Path(run_dir, "checkpoints").glob("step_*")
    return sorted(int(p.name[5:]) for p in folders if (p / "manifest.json").is_file())


def test_lightning_recipe_trains_validates_and_checkpoints(ray_cluster, tmp_path, quiet_console):
    result = forge.train(
        overrides(ray_cluster, tmp_path, "trainer.max_steps=20"), console=quiet_console
    )

    assert result.global_step == 20
    assert 0.0 <= result.metrics["val/accuracy"] <= 1.0 and "val/loss" in result.metrics
    assert committed_steps(result.run_dir) == [10, 20]
    manifest = json.loads(Path(result.last_checkpoint, "manifest.json").read_text())
    assert manifest["step"] == 20 and manifest["world_size"] == 2
    assert manifest["strategy"] == "ddp" and manifest["state"]["step"] == 20
    assert {
        "model.safetensors",
        "optim.pt",
        "lightning.pt",
        "rank0.safetensors",
        "rank1.safetensors",
    } <= set(manifest["files"])
    # The checkpoint carries the validation metrics of its own step.
    assert manifest["metrics"]["val/accuracy"] == pytest.approx(result.metrics["val/accuracy"])

    # model.safetensors is the LightningModule's own state_dict.
    from safetensors.torch import load_file

    from recipes.lightning_digits import DigitsModule

    module = DigitsModule()
    module.load_state_dict(load_file(Path(result.last_checkpoint, "model.safetensors")))

    # Validation on 2 workers is exact: the value over the 359 real samples (Lightning's padded
    # sampler would count one sample twice, over 360), in the summary and in the manifest.
    import torch

    from recipes.digits import load_digits_tensors

    _, val_set = load_digits_tensors(0.2, 0)
    images, labels = val_set.tensors
    assert len(labels) == 359
    module.eval()
    with torch.no_grad():
        logits = module(images)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item() / 359
    accuracy = (logits.argmax(dim=1) == labels).sum().item() / 359
    assert result.metrics["val/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result.metrics["val/loss"] == pytest.approx(loss, abs=1e-5)
    assert manifest["metrics"]["val/loss"] == pytest.approx(loss, abs=1e-5)

    rows = read_metrics(str(Path(result.run_dir, "metrics.jsonl")))
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [10, 20]
    assert all("throughput/samples_per_s" in r and "lr" in r for r in rows if "train/loss" in r)
    console = quiet_console.file.getvalue()
    assert "optim.*" in console  # the Lightning module's configure_optimizers decides
    assert "checkpoint committed" in console and "Training finished" in console


@pytest.mark.slow  # ~70 s; the default run keeps the Lightning train test and the loop resume test
def test_lightning_resume_continues_from_the_saved_step(ray_cluster, tmp_path, quiet_console):
    # A row every step: the rows show exactly which optimizer steps each run executed.
    base = overrides(
        ray_cluster, tmp_path, "run_name=lightning-resume", "trainer.log_every_n_steps=1"
    )
    first = forge.train([*base, "trainer.max_steps=10"], console=quiet_console)
    assert first.global_step == 10 and committed_steps(first.run_dir) == [10]

    second = forge.train([*base, "trainer.max_steps=20", "resume=auto"], console=quiet_console)

    assert second.run_dir == first.run_dir
    assert second.global_step == 20
    assert "val/accuracy" in second.metrics
    assert "at step 10" in quiet_console.file.getvalue()  # the "resumed from ..." line
    assert committed_steps(second.run_dir) == [10, 20]
    rows = read_metrics(str(Path(second.run_dir, "metrics.jsonl")))
    # Run one logged steps 1..10, run two 11..20: nothing replayed, nothing skipped.
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 21))
    assert [r["step"] for r in rows if "val/accuracy" in r] == [10, 20]


def test_lightning_refusals_name_the_fix(tmp_path):
    # No Ray needed: the checks run on the worker before any training.
    from forge.checkpoint.store import CheckpointStore
    from forge.config.specs import RecipeSpec, RunSpec, StrategySpec
    from forge.errors import CheckpointError, ConfigError
    from forge.lightning_runner import check_strategy, lightning_checkpoint_dict

    recipe = RecipeSpec(
        name="lightning_digits", module="recipes.lightning_digits", kind="lightning"
    )
    spec = RunSpec(recipe=recipe).model_copy(
        update={"strategy": StrategySpec.model_construct(name="fsdp")}
    )
    with pytest.raises(ConfigError, match=r"strategy=fsdp .*CPU.*strategy=ddp"):
        check_strategy(spec)

    # A forge-loop checkpoint has no Lightning training state to resume from.
    loop_ckpt = CheckpointStore(str(tmp_path)).save(5, {"model.safetensors": b"x"}, strategy="ddp")
    with pytest.raises(CheckpointError, match=r"not written by a Lightning recipe"):
        lightning_checkpoint_dict(loop_ckpt)
