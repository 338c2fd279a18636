"""Every bad sweep is refused before Ray starts, in one paragraph; results files are right."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forge.errors import ConfigError
from forge.sweep.results import TrialRecord, best_trial, trials_csv, write_results
from forge.sweep.spec import default_name, plan_sweep

SMALL = ["trainer.max_steps=20", "scaling.num_workers=1"]


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        plan_sweep([*SMALL, *overrides])
    return str(info.value)


def test_plan_defaults():
    p = plan_sweep(
        [*SMALL, "sweep=asha", "sweep.grace_period=10", "seed=0,1", "optim.lr=choice(0.01,0.1)"]
    )
    assert (p.metric, p.mode, p.num_trials, p.sweep.scheduler) == ("val/loss", "min", 2, "asha")
    assert p.reported == ("val/accuracy", "val/loss")
    assert p.uri.endswith("/" + p.name) and p.name.startswith("digits-sweep-")


def test_metric_defaults_to_checkpoint_monitor_and_its_mode():
    p = plan_sweep([*SMALL, "checkpoint.monitor=val/accuracy", "checkpoint.mode=max", "seed=0,1"])
    assert (p.metric, p.mode) == ("val/accuracy", "max")
    p = plan_sweep([*SMALL, "sweep.metric=val/accuracy", "seed=0,1"])
    assert p.mode == "max"


def test_unknown_key_with_did_you_mean():
    msg = refused(["optim.lrr=0.1,0.2"])
    assert "optim.lrr" in msg and "Did you mean 'lr'" in msg


def test_every_choice_is_validated():
    msg = refused(["optim.name=choice(sgd,adamw,lion)"])
    assert "optim.name=lion" in msg and "choice(sgd,adamw,lion)" in msg


def test_both_interval_ends_are_validated():
    msg = refused(["optim.momentum=interval(0.5,1.5)"])
    assert "optim.momentum=1.5" in msg and "less than 1" in msg
    msg = refused(["optim.lr=interval(0,0.1)"])
    assert "optim.lr=0.0" in msg and "greater than 0" in msg


def test_wrong_type_refused():
    assert "trainer.max_steps='a'" in refused(["trainer.max_steps=choice(a,5)"])


def test_empty_or_inverted_range_refused():
    assert "is empty" in refused(["seed=range(3,1)"])
    assert "inverted" in refused(["optim.lr=interval(0.1,0.01)"])


def test_num_samples_below_one_refused():
    assert "sweep.num_samples=0" in refused(["sweep.num_samples=0"])


def test_metric_not_reported_lists_what_is():
    msg = refused(["sweep.metric=val/f1", "seed=0,1"])
    assert "val/f1" in msg and "val/accuracy, val/loss" in msg


def test_pbt_refuses_keys_that_cannot_change_within_a_run():
    msg = refused(["sweep=pbt", "scaling.num_workers=1,2"])
    assert "cannot search scaling.num_workers" in msg and "optim.lr" in msg
    assert "recipe.params.channels" in refused(["sweep=pbt", "recipe.params.channels=8,16"])
    # the recipe may declare params PBT can change (digits: dropout)
    plan_sweep(
        [*SMALL, "sweep=pbt", "recipe.params.dropout=interval(0.0,0.3)", "optim.lr=0.01,0.1"]
    )


def test_fractional_gpus_with_many_workers_refused():
    msg = refused(
        ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "scaling.num_workers=2", "seed=0,1"]
    )
    assert "two ranks" in msg and "scaling.gpus_per_worker=1" in msg
    plan_sweep(
        [*SMALL, "scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "seed=0,1"]
    )  # one worker per trial may share a GPU


def test_asha_grace_period_beyond_max_steps_refused():
    assert "sweep.grace_period=100" in refused(["sweep=asha", "seed=0,1"])
    plan_sweep([*SMALL, "sweep=pbt", "optim.lr=0.1,0.2"])  # PBT has no grace period


def test_unknown_sweep_key_refused():
    assert "Unknown config key 'sweep.grace'" in refused(["sweep=asha", "+sweep.grace=3"])


def test_default_name_depends_on_the_command_only():
    assert default_name("d", ["a=1", "b=2"]) == default_name("d", ["b=2", "a=1"])
    assert default_name("d", ["a=1"]) != default_name("d", ["a=2"])
    assert default_name("d", ["a=1", "ray.address=x:1"]) == default_name("d", ["a=1"])


def test_sweep_expression_without_multirun_is_refused_by_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "forge", "seed=0,1", "trainer.max_steps=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "seed=0,1 is a sweep expression" in out.stderr and "Add -m" in out.stderr


def test_bad_sweep_from_the_cli_exits_2_without_ray():
    out = subprocess.run(
        [sys.executable, "-m", "forge", "-m", "sweep.num_samples=0", "seed=0,1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "sweep.num_samples=0" in out.stderr
    assert "ray" not in out.stderr.lower().replace("array", "")


# --- results --------------------------------------------------------------------------------


def records() -> list[TrialRecord]:
    a = TrialRecord(
        "a",
        {"optim.lr": 0.1, "seed": 0},
        "TERMINATED",
        [{"step": 10, "val/loss": 0.9}, {"step": 20, "val/loss": 0.5}],
        "/r/a",
        "/r/a/ck",
        40,
    )
    b = TrialRecord(
        "b",
        {"optim.lr": 0.01, "seed": 1},
        "TERMINATED",
        [
            {"step": 10, "val/loss": 0.7},
            {"step": 20, "val/loss": 0.4},
            {"step": 40, "val/loss": 0.45},
        ],
        "/r/b",
        "/r/b/ck",
        40,
    )
    return [a, b]


def test_best_trial_and_csv_rows():
    a, b = records()
    assert best_trial([a, b], "val/loss", "min") is b
    assert best_trial([a, b], "val/loss", "max") is a
    rows = list(csv.DictReader(io.StringIO(trials_csv([a, b], "val/loss", "min"))))
    assert rows[0]["stopped_early"] == "True" and rows[1]["stopped_early"] == "False"
    assert rows[1]["final_val/loss"] == "0.45" and rows[1]["best_val/loss"] == "0.4"
    assert rows[0]["steps"] == "20" and rows[1]["optim.lr"] == "0.01"


def test_write_results_commits_files_then_manifest(tmp_path: Path):
    a, b = records()
    files = write_results(
        str(tmp_path),
        [a, b],
        "val/loss",
        "min",
        ["optim.lr=0.01", "seed=1"],
        {"optim": {"lr": 0.01}, "seed": 1},
        "digits",
    )
    manifest = json.loads((tmp_path / "results_manifest.json").read_text())
    assert set(manifest["files"]) == {
        "trials.csv",
        "best.yaml",
        "plots/metric_vs_step.png",
        "plots/metric_vs_optim_lr.png",
        "plots/metric_vs_seed.png",
    }
    for name, entry in manifest["files"].items():
        assert (tmp_path / name).stat().st_size == entry["size"]
    assert (tmp_path / "plots/metric_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    best = (tmp_path / "best.yaml").read_text()
    assert "python -m forge optim.lr=0.01 seed=1" in best and "Best trial b" in best
    data = yaml.safe_load(best)
    assert data["optim"]["lr"] == 0.01 and data["defaults"] == [{"override /recipe": "digits"}]
    assert files["best.yaml"].endswith("best.yaml")


def test_forge_sweep_is_callable_whatever_was_imported_first(monkeypatch) -> None:
    """Importing forge.sweep.* binds the package as forge.sweep; it must still run sweeps."""
    import forge
    import forge.sweep.grammar  # binds the package as the attribute forge.sweep
    import forge.sweep.run

    monkeypatch.setattr(forge.sweep.run, "sweep", lambda overrides, **kw: ("swept", overrides))
    assert forge.sweep(["sweep=asha"]) == ("swept", ["sweep=asha"])


def test_pbt_refuses_lightning_recipes_whose_loop_does_not_wait_for_tune():
    msg = refused(["experiment=lightning_digits", "sweep=pbt", "optim.lr=0.01,0.1"])
    assert "Lightning" in msg and "sweep=asha" in msg
