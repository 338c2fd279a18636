"""The driver's planning: run folders, resume, redaction and provenance. No Ray."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import forge.api
from forge.api import newest_resumable_run, plan_run, redact_overrides, resume_command
from forge.checkpoint import storage
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import RunSpec
from forge.config.validate import to_run_spec
from forge.errors import ConfigError
from forge.run_folder import config_hash, redacted_config, write_provenance

# 2024-01-02 03:04:05 UTC
LAUNCH = 1704164645.0


@pytest.fixture(autouse=True)
def no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan_run records the git sha; keep the unit tests independent of the checkout."""
    monkeypatch.setattr(forge.api, "git_state", lambda *a, **k: ("f" * 40, False))


def make_spec(root: Path, *overrides: str) -> tuple[RunSpec, dict]:
    cfg = compose([f"storage.uri={root}", *overrides])
    return to_run_spec(cfg), redacted_config(cfg)


def commit(run_dir: Path, step: int = 10) -> str:
    ckpt = CheckpointStore(str(run_dir)).save(step, {"model.bin": b"w"}, strategy="ddp")
    assert ckpt is not None
    return ckpt.uri


# --------------------------------------------------------------------------------------------
# plan_run


def test_new_run_name_pattern(tmp_path: Path) -> None:
    spec, saved = make_spec(tmp_path)
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert notice is None
    assert plan.run_uri == str(tmp_path / "digits-20240102-030405")
    assert re.fullmatch(r"digits-\d{8}-\d{6}", Path(plan.run_uri).name)
    assert plan.resume_from is None
    assert plan.launch_time == LAUNCH
    assert plan.config_hash == config_hash(saved) and len(plan.config_hash) == 64
    assert plan.git_sha == "f" * 40


def test_run_name_is_used_as_given(tmp_path: Path) -> None:
    spec, saved = make_spec(tmp_path, "run_name=exp1")
    plan, _ = plan_run(spec, saved, LAUNCH)
    assert plan.run_uri == str(tmp_path / "exp1")


def test_relative_storage_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose(["storage.uri=runs", "run_name=r"])
    plan, _ = plan_run(to_run_spec(cfg), redacted_config(cfg), LAUNCH)
    assert plan.run_uri == str(tmp_path / "runs" / "r")


def test_remote_storage_keeps_its_uri() -> None:
    cfg = compose(["storage.uri=memory://forge-unit-plan/runs", "run_name=r"])
    plan, _ = plan_run(to_run_spec(cfg), redacted_config(cfg), LAUNCH)
    assert plan.run_uri == "memory://forge-unit-plan/runs/r"


def test_existing_run_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    commit(tmp_path / "exp1")
    spec, saved = make_spec(tmp_path, "run_name=exp1")
    with pytest.raises(ConfigError) as info:
        plan_run(spec, saved, LAUNCH)
    msg = str(info.value)
    assert str(tmp_path / "exp1") in msg
    assert "resume=auto" in msg
    assert "run_name=exp1" in msg


def test_existing_run_folder_without_committed_checkpoints_is_reused(tmp_path: Path) -> None:
    # A run that crashed before its first commit: nothing to clobber.
    storage.write_bytes(str(tmp_path / "exp1" / "checkpoints" / "step_00000010" / "m"), b"x")
    spec, saved = make_spec(tmp_path, "run_name=exp1")
    plan, _ = plan_run(spec, saved, LAUNCH)
    assert plan.run_uri == str(tmp_path / "exp1")


def test_resume_auto_picks_the_newest_run_of_the_same_recipe(tmp_path: Path) -> None:
    commit(tmp_path / "digits-20240101-000000")
    commit(tmp_path / "digits-20240102-000000")
    # newer, but no committed checkpoint (a crash mid-save)
    storage.write_bytes(
        str(tmp_path / "digits-20240103-000000" / "checkpoints" / "step_00000010" / "m"), b"x"
    )
    (tmp_path / "digits-20240104-000000").mkdir()  # newer, empty
    commit(tmp_path / "tabular-20250101-000000")  # newer, another recipe
    commit(tmp_path / "lightning_digits-20250101-000000")  # name ends with the recipe's
    commit(tmp_path / "mydigits")  # not a forge-named run

    assert newest_resumable_run(str(tmp_path), "digits") == "digits-20240102-000000"
    spec, saved = make_spec(tmp_path, "resume=auto")
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert notice is None
    assert plan.run_uri == str(tmp_path / "digits-20240102-000000")
    assert plan.resume_from is None  # the run's own checkpoints are found by the loop


def test_resume_auto_with_run_name(tmp_path: Path) -> None:
    commit(tmp_path / "exp1")
    commit(tmp_path / "digits-20990101-000000")
    spec, saved = make_spec(tmp_path, "resume=auto", "run_name=exp1")
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert notice is None
    assert plan.run_uri == str(tmp_path / "exp1")


def test_resume_auto_without_checkpoints_starts_a_new_run(tmp_path: Path) -> None:
    commit(tmp_path / "tabular-20240101-000000")
    spec, saved = make_spec(tmp_path, "resume=auto")
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert plan.run_uri == str(tmp_path / "digits-20240102-030405")
    assert notice is not None and "no committed checkpoint" in notice and "digits" in notice


def test_resume_auto_on_a_missing_storage_root(tmp_path: Path) -> None:
    spec, saved = make_spec(tmp_path / "does-not-exist", "resume=auto")
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert notice is not None
    assert plan.run_uri.startswith(str(tmp_path / "does-not-exist"))


def test_resume_from_a_committed_checkpoint(tmp_path: Path) -> None:
    uri = commit(tmp_path / "old", step=20)
    spec, saved = make_spec(tmp_path, f"resume={uri}/")
    plan, notice = plan_run(spec, saved, LAUNCH)
    assert notice is None
    assert plan.resume_from == uri
    assert plan.run_uri == str(tmp_path / "digits-20240102-030405")  # a new run folder


def test_resume_from_an_uncommitted_folder_is_refused(tmp_path: Path) -> None:
    partial = tmp_path / "old" / "checkpoints" / "step_00000020"
    storage.write_bytes(str(partial / "model.bin"), b"half")
    spec, saved = make_spec(tmp_path, f"resume={partial}")
    with pytest.raises(ConfigError) as info:  # a wrong resume= value: exit 2 from the CLI
        plan_run(spec, saved, LAUNCH)
    assert str(partial) in str(info.value)
    assert "not a committed checkpoint" in str(info.value)


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    uri = commit(tmp_path / "old")
    storage.write_bytes(storage.join(uri, "model.bin"), b"W")
    spec, saved = make_spec(tmp_path, f"resume={uri}")
    with pytest.raises(ConfigError, match="corrupt|does not match"):
        plan_run(spec, saved, LAUNCH)


def test_resume_from_a_uri_into_a_run_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    """resume=<uri> starts "in a new run folder". Into a folder that already has checkpoints the
    loop would pick that folder's own newest checkpoint and silently ignore the one asked for."""
    uri = commit(tmp_path / "old", step=20)
    commit(tmp_path / "exp1", step=50)
    spec, saved = make_spec(tmp_path, f"resume={uri}", "run_name=exp1")
    with pytest.raises(ConfigError, match="exp1"):
        plan_run(spec, saved, LAUNCH)


def test_config_hash_ignores_launch_settings(tmp_path: Path) -> None:
    _, a = make_spec(tmp_path)
    _, b = make_spec(tmp_path, "run_name=other", "resume=auto", "verbose=true", "ray.num_cpus=3")
    _, c = make_spec(tmp_path, "optim.lr=0.5")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)


# --------------------------------------------------------------------------------------------
# redaction and the resume command


def test_redact_overrides() -> None:
    overrides = [
        "storage.secret_key=abc",
        "+storage.aws_access_key=AKIA",
        "my.PASSWORD=hunter2",
        "hub.token=t0k",
        "db.passwd=p",
        "cloud.credentials=c",
        "trainer.max_steps=5",
        "~checkpoint.monitor",
        "experiment=tabular",
    ]
    assert redact_overrides(overrides) == [
        "storage.secret_key=<redacted>",
        "+storage.aws_access_key=<redacted>",
        "my.PASSWORD=<redacted>",
        "hub.token=<redacted>",
        "db.passwd=<redacted>",
        "cloud.credentials=<redacted>",
        "trainer.max_steps=5",
        "~checkpoint.monitor",
        "experiment=tabular",
    ]
    joined = " ".join(redact_overrides(overrides))
    for secret in ("abc", "AKIA", "hunter2", "t0k"):
        assert f"={secret}" not in joined


def test_resume_command() -> None:
    cmd = resume_command(
        [
            "experiment=tabular",
            "trainer.max_steps=500",
            "resume=auto",
            "run_name=old",
            "storage.secret_key=abc",
            "recipe.params.note='a b'",
        ],
        "/data/runs/tabular-20240102-030405/",
    )
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "forge"]
    assert args[3:] == [
        "experiment=tabular",
        "trainer.max_steps=500",
        "storage.secret_key=<redacted>",
        "recipe.params.note='a b'",
        "run_name=tabular-20240102-030405",
        "resume=auto",
    ]
    assert "abc" not in cmd


def test_resume_command_for_a_remote_run() -> None:
    cmd = resume_command([], "s3://bucket/runs/digits-20240102-030405")
    assert cmd == "python -m forge run_name=digits-20240102-030405 resume=auto"


def test_resume_command_round_trips_through_plan_run(tmp_path: Path) -> None:
    spec, saved = make_spec(tmp_path)
    plan, _ = plan_run(spec, saved, LAUNCH)
    commit(Path(plan.run_uri))
    args = shlex.split(resume_command([f"storage.uri={tmp_path}"], plan.run_uri))[3:]
    spec2, saved2 = make_spec(tmp_path, *args)
    plan2, notice = plan_run(spec2, saved2, LAUNCH + 3600)
    assert notice is None
    assert plan2.run_uri == plan.run_uri


SECRET = "s3cr3t-Value-7f2a"


def test_redacted_config_hides_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_TEST_RAY_ADDRESS", f"ray://admin:{SECRET}@head:10001")
    cfg = compose(["ray.address=${oc.env:FORGE_TEST_RAY_ADDRESS}"])
    spec = to_run_spec(cfg)
    assert SECRET in spec.ray.address  # the workers get the real value...
    saved = redacted_config(cfg)
    assert saved["ray"]["address"] == "<redacted: from env FORGE_TEST_RAY_ADDRESS>"
    assert SECRET not in json.dumps(saved)  # ... the saved config does not
    assert saved["trainer"]["max_steps"] == spec.trainer.max_steps  # the rest is resolved


def test_redacted_config_hides_env_values_with_defaults_and_inside_strings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORGE_TEST_TOKEN", SECRET)
    cfg = OmegaConf.create(
        {
            "a": "${oc.env:FORGE_TEST_TOKEN,fallback}",
            "b": "prefix-${oc.env:FORGE_TEST_TOKEN}-suffix",
            "c": ["${oc.env:FORGE_TEST_TOKEN}", "plain"],
            "d": {"e": "${oc.env:FORGE_TEST_TOKEN}"},
        }
    )
    saved = redacted_config(cfg)
    assert SECRET not in json.dumps(saved)
    assert saved["c"][1] == "plain"
    assert saved["a"] == "<redacted: from env FORGE_TEST_TOKEN>"


def test_redacted_config_hides_values_interpolated_from_env_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value that interpolates another key read from the environment carries the secret too."""
    monkeypatch.setenv("FORGE_TEST_TOKEN", SECRET)
    cfg = OmegaConf.create(
        {"token": "${oc.env:FORGE_TEST_TOKEN}", "url": "https://user:${token}@host/bucket"}
    )
    saved = redacted_config(cfg)
    assert SECRET not in json.dumps(saved)


def test_write_provenance_never_saves_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_TEST_RAY_ADDRESS", f"ray://admin:{SECRET}@head:10001")
    overrides = [
        "ray.address=${oc.env:FORGE_TEST_RAY_ADDRESS}",
        f"storage.uri={tmp_path}",
        f"storage.secret_key={SECRET}",
    ]
    cfg = compose(overrides[:2])
    spec = to_run_spec(cfg)
    saved = redacted_config(cfg)
    plan, _ = plan_run(spec, saved, LAUNCH)
    write_provenance(
        plan.run_uri,
        saved,
        redact_overrides(overrides),
        seed=spec.seed,
        world_size=spec.scaling.num_workers,
        git_sha="abc",
        git_dirty=True,
    )
    run_dir = Path(plan.run_uri)
    for name in ("config.yaml", "overrides.txt", "run.json"):
        text = (run_dir / name).read_text()
        assert SECRET not in text, name

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["ray"]["address"] == "<redacted: from env FORGE_TEST_RAY_ADDRESS>"
    assert config["recipe"]["name"] == "digits"
    assert config["storage"]["uri"] == str(tmp_path)
    assert "hydra" not in config
    assert (run_dir / "overrides.txt").read_text().splitlines() == [
        "ray.address=${oc.env:FORGE_TEST_RAY_ADDRESS}",
        f"storage.uri={tmp_path}",
        "storage.secret_key=<redacted>",
    ]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["git_sha"] == "abc" and info["git_dirty"] is True
    assert info["seed"] == 0 and info["world_size"] == 2
    assert "torch" in info["versions"]
    # The saved config composes back into the same spec (with the redacted value).
    assert RunSpec.model_validate({**config, "ray": {}}).trainer == spec.trainer


def test_write_provenance_to_memory_storage() -> None:
    run_uri = f"memory://forge-unit-prov-{time.time_ns()}/run"
    write_provenance(
        run_uri, {"seed": 1}, ["seed=1"], seed=1, world_size=1, git_sha=None, git_dirty=None
    )
    assert storage.read_bytes(storage.join(run_uri, "overrides.txt")) == b"seed=1\n"
    assert b"seed: 1" in storage.read_bytes(storage.join(run_uri, "config.yaml"))
