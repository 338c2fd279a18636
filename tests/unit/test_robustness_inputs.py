"""Issue 9, the input side: odd local paths, remote URI checks, every key's domain, secrets,
the printed resume command, and resuming the same run. No Ray: ``forge.train`` runs with a
fake launch that commits a checkpoint the way rank 0 would (fenced on the run lock).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel

import forge
import forge.api
import forge.cluster
import forge.launch
from forge.checkpoint import storage
from forge.checkpoint.lock import LOCK_NAME, RunLock, commit_fence
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import RunSpec
from forge.config.validate import to_run_spec
from forge.errors import ConfigError, TrainingError

SECRET = "hunter2-very-secret-value"
ODD_NAMES = ["lr=0.001", "a::b", "x#frag", "q?a=1", "p%41", "g*[1]{2}", "sp ace"]


@pytest.fixture(autouse=True)
def no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forge.api, "git_state", lambda *a, **k: ("f" * 40, False))


@pytest.fixture()
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> list:
    """forge.train without Ray; each launch commits step (resumed step + 10) like rank 0."""
    import safetensors.torch
    import torch

    launches: list = []

    @contextlib.contextmanager
    def session(spec, verbose=False):
        yield

    def launch(spec, plan, on_progress, report_acks=None):
        launches.append((spec, plan))
        fence = commit_fence(plan.run_uri, plan.lock_token)
        store = CheckpointStore(plan.run_uri, fence=fence)
        step = (plan.resumed_step or 0) + 10
        weights = safetensors.torch.save({"w": torch.ones(2)})
        ckpt = store.save(step, {"model.safetensors": weights}, strategy="ddp")
        return {"step": step, "last_checkpoint": ckpt.uri, "val/loss": 0.5}

    monkeypatch.setattr(forge.cluster, "ray_session", session)
    monkeypatch.setattr(forge.cluster, "check_resources", lambda scaling: None)
    monkeypatch.setattr(forge.cluster, "check_storage_shared", lambda storage: None)
    monkeypatch.setattr(forge.launch, "launch", launch)
    return launches


def console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=10_000, soft_wrap=True)


def secret_recipe(tmp_path: Path) -> str:
    path = tmp_path / "secret_recipe.py"
    path.write_text(
        "from dataclasses import dataclass\n"
        "from recipes.digits import build, train_size, Params as _DigitsParams\n"
        "@dataclass\n"
        "class Params(_DigitsParams):\n"
        "    api_key: str = ''\n"
    )
    return str(path)


# --------------------------------------------------------------------------------------------
# 1. paths: local paths are never parsed as URLs; remote URIs are checked up front


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_local_folder_and_run_names_stay_where_they_are_put(tmp_path: Path, name) -> None:
    root = tmp_path / "odd::dir"
    run = str(root / name)
    store = CheckpointStore(run, keep_last=1)
    store.save(10, {"w.bin": b"a"}, strategy="ddp")
    store.save(20, {"w.bin": b"b"}, strategy="ddp")  # retention deletes step 10, only it
    lock = RunLock.acquire(run, heartbeat_s=None)
    assert sorted(os.listdir(root)) == [name]
    assert sorted(os.listdir(root / name)) == [LOCK_NAME, "checkpoints"]
    assert sorted(os.listdir(root / name / "checkpoints")) == ["latest.json", "step_00000020"]
    assert CheckpointStore(run).latest().read("w.bin") == b"b"
    lock.release()
    storage.remove(run)
    assert os.listdir(root) == []


def test_a_run_under_an_odd_local_path_resumes(tmp_path: Path, fake_ray) -> None:
    root = str(tmp_path / "data" / "odd::dir")
    args = [f"storage.uri={root}", 'run_name="r1#x"']
    first = forge.train(args, console=console())
    assert first.run_dir == f"{root}/r1#x"
    assert sorted(os.listdir(first.run_dir)) == [
        "checkpoints",
        "config.yaml",
        "data_profile.json",
        "overrides.txt",
        "run.json",
    ]
    again = forge.train([*args, "resume=auto"], console=console())
    assert again.global_step == 20  # continued from step 10, not from 0
    assert not (tmp_path / "data" / "odd").exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("storage.uri=s3://bucket/a::b", "'::'"),
        ("storage.uri=s3://bucket/runs?versionId", "'?'"),
        ('storage.uri="s3://bucket/runs#frag"', "'#'"),
        ("storage.uri=s3://bucket/r*", "'*'"),
        ("storage.uri=s3://Bad_Bucket/runs", "not a valid S3 bucket name"),
        ("storage.uri=s3://b/runs", "not a valid S3 bucket name"),
        ("storage.uri=nosuchscheme://bucket/runs", "unknown storage scheme"),
        ("resume=s3://bucket/a::b/checkpoints/step_00000010", "resume="),
    ],
)
def test_remote_uris_are_checked_before_anything_starts(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_run_spec(compose([override]))
    assert words in str(info.value)


def test_run_names_are_checked_against_remote_storage() -> None:
    with pytest.raises(ConfigError, match=r"run_name='r\[1\]'.*'\['"):
        to_run_spec(compose(["storage.uri=s3://bucket/runs", 'run_name="r[1]"']))
    # the same name is fine locally: it is never parsed there
    assert to_run_spec(compose(['run_name="r[1]"'])).run_name == "r[1]"


# --------------------------------------------------------------------------------------------
# 6. every key has a checked domain


def _float_keys(model: type[BaseModel] = RunSpec, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _float_keys(ann, f"{prefix}{name}.")
        elif float in typing.get_args(ann) or ann is float:
            keys.append(prefix + name)
    return keys


def test_every_float_key_is_found() -> None:
    keys = _float_keys()
    assert {"optim.lr", "storage.lock_stale_after_s", "trainer.gradient_clip_val"} <= set(keys)
    assert len(keys) >= 12


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_values_are_refused_for_every_float_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_run_spec(compose([f"++{key}={value}"]))


def test_non_finite_betas_are_refused() -> None:
    for betas in ("[0.9,nan]", "[inf,0.9]", "[0.9,1.0]", "[-0.1,0.9]"):
        with pytest.raises(ConfigError, match="optim.betas"):
            to_run_spec(compose([f"optim.betas={betas}"]))


def test_every_numeric_key_has_bounds() -> None:
    """A new int/float key without a range is a key whose domain nobody checked."""
    unbounded = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            if typing.get_origin(ann) is tuple:
                continue  # optim.betas: its own validator (test_non_finite_betas_are_refused)
            args = typing.get_args(ann) or (ann,)
            if not ({int, float} & set(args)) or bool in args:
                continue
            bounds = [m for m in field.metadata if hasattr(m, ("ge")) or hasattr(m, "gt")]
            nested = [a for a in args if typing.get_origin(a) is typing.Annotated]
            if not bounds and not nested:
                unbounded.append(prefix + name)

    walk(RunSpec, "")
    assert unbounded == []


@pytest.mark.parametrize("experiment", ["digits", "lightning_digits"])
@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64 - 1)])
def test_seeds_out_of_range_are_refused_for_every_recipe_kind(experiment, seed) -> None:
    with pytest.raises(ConfigError, match=r"seed=.*4294967295"):
        to_run_spec(compose([f"experiment={experiment}", f"seed={seed}"]))


def test_largest_seed_is_accepted() -> None:
    assert to_run_spec(compose([f"seed={2**32 - 1}"])).seed == 2**32 - 1


def test_lock_timeout_shorter_than_a_safe_multiple_of_the_heartbeat_is_refused() -> None:
    with pytest.raises(ConfigError, match="storage.lock_stale_after_s"):
        to_run_spec(compose(["storage.lock_stale_after_s=1"]))
    with pytest.raises(ConfigError):
        to_run_spec(compose(["storage.lock_stale_after_s=60"]))  # two heartbeats: too close
    assert to_run_spec(compose(["storage.lock_stale_after_s=120"]))


@pytest.mark.parametrize("address", ["foo", "host", "http://x:1", "1.2.3.4:port"])
def test_ray_address_has_a_domain(address: str) -> None:
    with pytest.raises(ConfigError, match="is not a Ray address"):
        to_run_spec(compose([f"ray.address={address}"]))


def test_batch_larger_than_the_training_set_is_refused_on_the_driver() -> None:
    """digits has 1,438 training images: 719 per worker on 2 workers."""
    with pytest.raises(ConfigError, match=r"1438 samples: 719 per worker.*data.batch_size=720"):
        to_run_spec(compose(["data.batch_size=720"]))
    assert to_run_spec(compose(["data.batch_size=719"]))
    with pytest.raises(ConfigError, match=r"456 samples"):
        to_run_spec(compose(["experiment=tabular", "data.batch_size=300"]))


def test_recipe_train_size_matches_its_data() -> None:
    import recipes.digits
    import recipes.tabular

    for frac in (0.2, 0.37):
        train, _ = recipes.digits.load_digits_tensors(frac, 0)
        assert recipes.digits.train_size(recipes.digits.Params(val_fraction=frac)) == len(train)
        train, _ = recipes.tabular.split(*recipes.tabular.load_frame(), frac, 0)
        assert recipes.tabular.train_size(recipes.tabular.Params(val_fraction=frac)) == len(train)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from forge.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("bad", ["=3", "+=3", "~=1"])
def test_override_without_a_key_exits_2(bad: str, capsys) -> None:
    code, text = run_cli([bad], capsys)
    assert code == 2 and "configuration error" in text and "has no key" in text
    assert "Traceback" not in text


def test_unwritable_storage_uri_exits_2(tmp_path: Path, fake_ray, capsys) -> None:
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    for uri in ("/proc/forge_runs", str(readonly / "runs")):
        if os.access(readonly, os.W_OK) and uri != "/proc/forge_runs":
            continue  # root ignores permissions; /proc is read-only for everyone
        code, text = run_cli([f"storage.uri={uri}"], capsys)
        assert code == 2 and "cannot write to" in text and "Traceback" not in text, text
    assert fake_ray == []  # nothing launched


def test_resume_from_a_folder_that_is_not_a_checkpoint_exits_2(tmp_path, fake_ray, capsys):
    code, text = run_cli([f"storage.uri={tmp_path}", f"resume={tmp_path}"], capsys)
    assert code == 2 and "not a committed checkpoint" in text
    assert fake_ray == []


# --------------------------------------------------------------------------------------------
# 5. secrets from the environment never appear resolved


def test_secret_from_env_never_appears_resolved(tmp_path, fake_ray, monkeypatch, capsys):
    monkeypatch.setenv("MY_SECRET", SECRET)
    monkeypatch.chdir(tmp_path)
    argv = [
        f"recipe.module={secret_recipe(tmp_path)}",
        "+recipe.params.api_key=${oc.env:MY_SECRET}",
        f"storage.uri={tmp_path}/runs",
        "run_name=s",
    ]
    code, text = run_cli(argv, capsys)
    assert code == 0, text
    assert SECRET not in text
    run = tmp_path / "runs" / "s"
    for name in ("config.yaml", "overrides.txt", "run.json"):
        assert SECRET not in (run / name).read_text(), name
    assert "+recipe.params.api_key=${oc.env:MY_SECRET}" in (run / "overrides.txt").read_text()
    # the printed resume command keeps the interpolation, quoted so the shell leaves it alone
    assert "'+recipe.params.api_key=${oc.env:MY_SECRET}'" in text


def test_validation_errors_never_echo_a_secret(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MY_SECRET", SECRET)
    for override in ("seed=${oc.env:MY_SECRET}", "recipe.params.channels=${oc.env:MY_SECRET}"):
        with pytest.raises(ConfigError) as info:
            to_run_spec(compose([override]))
        assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        to_run_spec(compose(["optim.lr=${oc.env:MY_SECRET}"]))
    assert SECRET not in str(info.value) and "${oc.env:MY_SECRET}" in str(info.value)


def test_worker_errors_and_console_lines_never_show_a_secret(tmp_path, fake_ray, monkeypatch):
    monkeypatch.setenv("MY_SECRET", SECRET)

    def leaky_launch(spec, plan, on_progress, report_acks=None):
        on_progress({"event": "warning", "message": f"key {spec.recipe.params['api_key']}"})
        raise TrainingError(f"worker failed with key {spec.recipe.params['api_key']}")

    monkeypatch.setattr(forge.launch, "launch", leaky_launch)
    out = console()
    args = [
        f"recipe.module={secret_recipe(tmp_path)}",
        "+recipe.params.api_key=${oc.env:MY_SECRET}",
        f"storage.uri={tmp_path}",
    ]
    with pytest.raises(TrainingError) as info:
        forge.train(args, console=out)
    assert SECRET not in str(info.value) and "<redacted" in str(info.value)
    assert SECRET not in out.file.getvalue() and "warning: key <redacted" in out.file.getvalue()


# --------------------------------------------------------------------------------------------
# 7. the printed resume command runs; 8. and continues the same run


def printed_args(command: str) -> list[str]:
    """What a POSIX shell passes to ``python -m forge`` for the printed command."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "forge"]
    return argv[3:]


def same_config(a, b) -> None:
    ra, rb = OmegaConf.to_container(a), OmegaConf.to_container(b)
    for r in (ra, rb):
        r.pop("resume")
        r.pop("run_name")
    assert ra == rb


@pytest.mark.parametrize("name", ["lr=0.001", 'it\'s "x"', "a,b", "[1]", "null", "3", "a$b"])
def test_printed_resume_command_composes_the_run(tmp_path, fake_ray, name: str) -> None:
    quoted = json.dumps(name)  # a Hydra quoted string
    original = [f"storage.uri={tmp_path}", f"run_name={quoted}", "optim.betas=[0.8,0.9]"]
    result = forge.train(original, console=console())
    args = printed_args(result.resume_command)
    cfg = compose(args)
    assert cfg.run_name == name and cfg.resume == "auto"
    same_config(cfg, compose(original))
    again = forge.train(args, console=console())  # what pasting it runs
    assert again.run_dir == result.run_dir and again.global_step == 20


def test_composed_config_prints_a_command_that_reproduces_it(tmp_path, fake_ray) -> None:
    cfg = forge.compose(["experiment=tabular", f"storage.uri={tmp_path}", "trainer.max_steps=5"])
    result = forge.train(cfg, console=console())
    args = printed_args(result.resume_command)
    assert "experiment=tabular" in args
    same_config(compose(args), cfg)
    assert (Path(result.run_dir) / "overrides.txt").read_text().split() == [
        "experiment=tabular",
        f"storage.uri={tmp_path}",
        "trainer.max_steps=5",
    ]
    again = forge.train(args, console=console())
    assert again.global_step == 20 and again.run_dir == result.run_dir


def test_config_changed_after_compose_still_reproduces(tmp_path, fake_ray) -> None:
    cfg = forge.compose(["experiment=tabular", f"storage.uri={tmp_path}"])
    cfg.trainer.max_steps = 7
    cfg.recipe.params.hidden = 32
    result = forge.train(cfg, console=console())
    args = printed_args(result.resume_command)
    same_config(compose(args), cfg)
    assert forge.train(args, console=console()).global_step == 20


def test_resume_with_another_recipe_is_refused_before_launch(tmp_path, fake_ray) -> None:
    first = forge.train(
        forge.compose(["experiment=tabular", f"storage.uri={tmp_path}"]), console=console()
    )
    name = Path(first.run_dir).name
    with pytest.raises(ConfigError) as info:  # the command of the bug report, no experiment=
        forge.train([f"storage.uri={tmp_path}", f"run_name={name}", "resume=auto"])
    msg = str(info.value)
    assert "recipe.name='tabular' (now 'digits')" in msg and "recipe.module" in msg
    assert "overrides.txt" in msg
    with pytest.raises(ConfigError, match=r"recipe.params.hidden=64 \(now 32\)"):
        forge.train(
            ["experiment=tabular", f"storage.uri={tmp_path}", f"run_name={name}"]
            + ["resume=auto", "recipe.params.hidden=32"]
        )
    assert len(fake_ray) == 1  # neither got as far as a launch


def test_resume_may_change_training_keys_and_records_them(tmp_path, fake_ray) -> None:
    base = [f"storage.uri={tmp_path}", "run_name=r"]
    forge.train(base, console=console())
    out = console()
    result = forge.train(
        [*base, "resume=auto", "optim.lr=0.0005", "trainer.max_steps=600"], console=out
    )
    assert result.global_step == 20
    assert "optim.lr 0.001 -> 0.0005" in out.file.getvalue()
    history = json.loads((tmp_path / "r" / "resumes.json").read_text())
    assert history[-1]["step"] == 10
    assert history[-1]["changed"] == {"optim.lr": [0.001, 0.0005], "trainer.max_steps": [300, 600]}
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.0005


def test_load_weights_hint_works_for_every_strategy(tmp_path, fake_ray) -> None:
    """The hint is consolidate(), which reads DDP's full file and FSDP/ZeRO fragments alike."""
    import torch

    from forge.checkpoint import consolidate  # noqa: F401  (the hint's name)
    from forge.strategies.fragments import ShardWriter

    out = console()
    result = forge.train([f"storage.uri={tmp_path}"], console=out)
    hint = next(line for line in out.file.getvalue().splitlines() if "load weights" in line)
    call = hint.split("load weights", 1)[1].strip()
    assert call == f"forge.checkpoint.consolidate({result.last_checkpoint!r})"
    assert torch.equal(eval(call, {"forge": forge})["w"], torch.ones(2))
    sharded = CheckpointStore(str(tmp_path / "fsdp"))
    files = {}
    for rank in range(2):
        writer = ShardWriter(rank, 2)
        writer.add("model/w", torch.arange(4.0)[2 * rank : 2 * rank + 2], (4,), 2 * rank)
        files.update({n: f() for n, f in writer.files().items()})
    ckpt = sharded.save(5, files, strategy="fsdp", world_size=2)
    call = call.replace(repr(result.last_checkpoint), repr(ckpt.uri))
    assert torch.equal(eval(call, {"forge": forge})["w"], torch.arange(4.0))
