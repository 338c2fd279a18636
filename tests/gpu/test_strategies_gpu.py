"""GPU-only strategy checks (``pytest -m gpu`` on a machine with CUDA GPUs; not run on CPU CI).

* The Lightning path under Lightning's FSDP and DeepSpeed strategies (which refuse CPUs):
  trains, checkpoints through forge, resumes on the same number of workers, and a ZeRO-2
  checkpoint resumes under ZeRO-3.
* bf16 on every forge-loop strategy; fp16 with loss scaling on DDP, FSDP and ZeRO-2.

Written without a GPU at hand: treat a failure here as a bug report, not as a broken test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import forge

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # collected on CPU machines too; -m gpu selects it
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a CUDA GPU")]

GPUS = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_lightning_recipe_under_fsdp_and_deepspeed(
    tmp_path: Path, quiet_console, gpu_ray, strategy
) -> None:
    base = [
        "experiment=lightning_digits",
        f"strategy={strategy}",
        "scaling=gpu",
        f"scaling.num_workers={GPUS}",
        f"storage.uri={tmp_path}",
        f"ray.address={gpu_ray}",
        "run_name=lightning-gpu",
        "checkpoint.every_n_steps=5",
        "trainer.val_every_n_steps=5",
    ]
    first = forge.train([*base, "trainer.max_steps=5"], console=quiet_console)
    manifest = json.loads(Path(first.last_checkpoint, "manifest.json").read_text())
    assert manifest["strategy"] == strategy and manifest["world_size"] == GPUS
    second = forge.train([*base, "trainer.max_steps=10", "resume=auto"], console=quiet_console)
    assert second.global_step == 10
    assert "at step 5" in quiet_console.file.getvalue()


@pytest.mark.parametrize(
    "strategy", ["ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]
)
def test_bf16_on_every_loop_strategy(tmp_path: Path, quiet_console, gpu_ray, strategy) -> None:
    result = forge.train(
        [
            "experiment=tinylm",
            f"strategy={strategy}",
            "scaling=gpu",
            f"scaling.num_workers={GPUS}",
            "trainer.precision=bf16",
            "trainer.max_steps=20",
            "recipe.params.max_files=5",
            f"storage.uri={tmp_path}",
            f"ray.address={gpu_ray}",
        ],
        console=quiet_console,
    )
    assert result.global_step == 20 and result.metrics["val/loss"] < 5.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2"])
def test_fp16_with_loss_scaling(tmp_path: Path, quiet_console, gpu_ray, strategy) -> None:
    """fp16 trains (GradScaler / ShardedGradScaler / DeepSpeed's scaler) and keeps its scale."""
    result = forge.train(
        [
            "experiment=tinylm",
            f"strategy={strategy}",
            "scaling=gpu",
            f"scaling.num_workers={GPUS}",
            "trainer.precision=fp16",
            "trainer.max_steps=20",
            "checkpoint.every_n_steps=10",
            "recipe.params.max_files=5",
            f"storage.uri={tmp_path}",
            f"ray.address={gpu_ray}",
        ],
        console=quiet_console,
    )
    assert result.global_step == 20 and result.metrics["val/loss"] < 5.0
    if strategy != "deepspeed_zero2":
        assert Path(result.last_checkpoint, "grad_scaler.json").is_file()


def test_lightning_deepspeed_checkpoint_resumes_under_another_stage(
    tmp_path: Path, quiet_console, gpu_ray
) -> None:
    """Lightning + ZeRO-2 checkpoint, resumed by Lightning + ZeRO-3 (forge's fragments reshard)."""
    base = [
        "experiment=lightning_digits",
        "scaling=gpu",
        f"scaling.num_workers={GPUS}",
        f"storage.uri={tmp_path}",
        f"ray.address={gpu_ray}",
        "run_name=lightning-ds-restage",
        "checkpoint.every_n_steps=5",
    ]
    forge.train([*base, "strategy=deepspeed_zero2", "trainer.max_steps=5"], console=quiet_console)
    second = forge.train(
        [*base, "strategy=deepspeed_zero3", "trainer.max_steps=10", "resume=auto"],
        console=quiet_console,
    )
    assert second.global_step == 10
    assert "at step 5" in quiet_console.file.getvalue()


def test_profile_steps_reports_the_gpu_busy_time(tmp_path: Path, quiet_console, gpu_ray) -> None:
    """trainer.profile_steps on CUDA: kernels are summed, and the busy time fits in the step."""
    result = forge.train(
        [
            "experiment=tinylm",
            "scaling=gpu",
            "scaling.num_workers=1",
            "trainer.precision=bf16",
            "trainer.max_steps=12",
            "trainer.profile_steps=[5,8]",
            "recipe.params.max_files=5",
            f"storage.uri={tmp_path}",
            f"ray.address={gpu_ray}",
        ],
        console=quiet_console,
    )
    summary = json.loads(Path(result.run_dir, "profile/rank0.summary.json").read_text())
    assert (summary["first_step"], summary["last_step"]) == (5, 8)
    assert 0 < summary["device_busy_ms_per_step"] <= 1.5 * summary["wall_ms_per_step"]
    assert summary["top"] and all(op["ms_per_step"] > 0 for op in summary["top"])
