"""forge.jobs without Ray processes: address, token, ids, the working dir, following, attaching."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from forge import jobs
from forge.errors import ClusterError, ConfigError

# ------------------------------------------------------------------------------- address


def test_address_precedence() -> None:
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "gcs:8265"}
    assert jobs.resolve_address("http://flag:8265/", env) == "http://flag:8265"
    assert jobs.resolve_address(None, env) == "http://api:8265"
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "head:8265"}) == "http://head:8265"


def test_no_address_is_one_paragraph() -> None:
    with pytest.raises(ConfigError, match="--address http://<head>:8265.*RAY_API_SERVER_ADDRESS"):
        jobs.resolve_address(None, {})


# --------------------------------------------------------------------------------- token


def test_token_sources_in_rays_order(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "tok"
    named.write_text("from-path")
    assert jobs.load_token({"RAY_AUTH_TOKEN": "from-env"}, home=tmp_path) == "from-env"
    assert jobs.load_token({"RAY_AUTH_TOKEN_PATH": str(named)}, home=tmp_path) == "from-path"
    assert jobs.load_token({}, home=tmp_path) == "from-home"
    assert jobs.load_token({}, home=tmp_path / "nobody") is None
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        jobs.load_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    assert jobs.auth_headers("t0k") == {"Authorization": "Bearer t0k"}
    assert jobs.auth_headers(None) == {}


def test_token_never_in_what_is_submitted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = "tok-9f8e7d6c5b4a-secret"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
    (tmp_path / "train.py").write_text("print('hi')\n")
    plan = jobs.plan_submission(["trainer.max_steps=5", "run_name=t"], working_dir=tmp_path)
    sent = json.dumps([plan.entrypoint, plan.runtime_env, plan.metadata, plan.overrides])
    assert token not in sent and "aws-secret-value-123" not in sent
    assert "env_vars" not in plan.runtime_env  # nothing of the client's environment travels

    calls = {}

    class Client:
        def __init__(self, address, headers=None):
            calls["headers"] = headers

    monkeypatch.setitem(
        sys.modules, "ray.job_submission", SimpleNamespace(JobSubmissionClient=Client)
    )
    jobs.make_client("http://head:8265")
    assert calls["headers"] == {"Authorization": f"Bearer {token}"}  # only in the header


def test_secret_override_is_refused_before_submission() -> None:
    with pytest.raises(ConfigError, match="visible to everyone who can list"):
        jobs.plan_submission(["+storage.aws_secret_access_key=abc"])


# ------------------------------------------------------------------------------ ids, plan


def test_submission_id_is_deterministic_per_run_and_storage() -> None:
    a = jobs.submission_id("exp1", "s3://b/runs")
    assert a == jobs.submission_id("exp1", "s3://b/runs/")
    assert a != jobs.submission_id("exp2", "s3://b/runs")
    assert a != jobs.submission_id("exp1", "s3://other/runs")
    assert jobs.submission_id("a b/c", "runs").startswith("forge-a_b_c-")
    assert jobs.attempt_id(a, 0) == a and jobs.attempt_id(a, 2) == f"{a}-r2"


def test_plan_validates_locally_and_builds_the_job(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        jobs.plan_submission(["trainer.max_step=5"], working_dir=tmp_path)
    plan = jobs.plan_submission(
        ["trainer.max_steps=5", "ray.address=somewhere:1"], working_dir=tmp_path, now=0
    )
    assert plan.run_name == "digits-19700101-000000"
    assert plan.overrides == ["trainer.max_steps=5", "run_name=digits-19700101-000000"]
    assert plan.entrypoint == (
        "python -m forge trainer.max_steps=5 run_name=digits-19700101-000000 ray.address=auto"
    )
    assert plan.submission_id == jobs.submission_id(plan.run_name, "runs")
    assert plan.runtime_env["working_dir"] == str(tmp_path.resolve())


def test_exit_codes() -> None:
    assert jobs.exit_code("SUCCEEDED", 0) == 0
    assert jobs.exit_code("FAILED", 1) == 1
    assert jobs.exit_code("FAILED", 2) == 2  # forge.cli's configuration-error exit code
    assert jobs.exit_code("FAILED", None) == 1
    assert jobs.exit_code("STOPPED", None) == 1


# ---------------------------------------------------------------------------- working dir


def _tree(root: Path) -> None:
    files = {
        "configs/train.yaml": 10,
        "recipes/mine.py": 20,
        "forge/data/source.py": 30,  # code named data, deeper down: kept
        "runs/exp1/checkpoints/model.safetensors": 5000,
        "outputs/x.log": 100,
        ".git/objects/ab": 700,
        ".venv/lib/torch.so": 9000,
        "myenv/lib/big.so": 8000,
        "data/train.parquet": 6000,
        ".gpu-bundle/blob": 4000,
        "recipes/__pycache__/mine.cpython-311.pyc": 50,
        "notes/ignored.tmp": 60,
        "notes/keep.md": 70,
    }
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "notes" / ".gitignore").write_text("*.tmp\n")


def test_upload_leaves_out_runs_envs_git_data(tmp_path: Path) -> None:
    _tree(tmp_path)
    patterns = [*jobs.DEFAULT_EXCLUDES, *jobs.find_virtualenvs(tmp_path)]
    got = dict(jobs.upload_files(tmp_path, patterns))
    assert set(got) == {
        "configs/train.yaml",
        "recipes/mine.py",
        "forge/data/source.py",
        "notes/keep.md",
        "notes/.gitignore",
    }


def test_upload_list_is_what_ray_uploads(tmp_path: Path) -> None:
    """The size check counts exactly the files Ray's own packaging walks."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    _tree(tmp_path)
    patterns = [*jobs.DEFAULT_EXCLUDES, *jobs.find_virtualenvs(tmp_path)]
    ray_files = set()

    def handler(path: Path) -> None:
        if path.is_file():
            ray_files.add(path.relative_to(tmp_path).as_posix())

    _dir_travel(tmp_path, [_get_excludes(tmp_path, patterns)], handler, include_gitignore=True)
    assert ray_files == {name for name, _ in jobs.upload_files(tmp_path, patterns)}


def test_too_large_upload_names_the_largest_files(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "big.bin").write_bytes(b"x" * (3 * 2**20))
    (tmp_path / "small.py").write_text("x = 1\n")
    with pytest.raises(ConfigError) as info:
        jobs.plan_submission(["run_name=t"], working_dir=tmp_path, max_upload_mb=2)
    message = str(info.value)
    assert "3.0 MiB" in message and "weights/big.bin (3.0 MiB)" in message
    assert ".rayignore" in message
    plan = jobs.plan_submission(
        ["run_name=t"], working_dir=tmp_path, max_upload_mb=2, excludes=["weights/"]
    )
    assert plan.upload_bytes == len("x = 1\n")


def test_recipe_file_travels_as_a_package_and_imports_where_its_path_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forge.recipe import import_recipe_module, shipped_package_name

    source = Path(__file__).resolve().parents[2] / "recipes" / "digits.py"
    recipe = tmp_path / "elsewhere" / "my_cnn.py"
    recipe.parent.mkdir()
    recipe.write_text(source.read_text())
    (tmp_path / "project").mkdir()
    plan = jobs.plan_submission(
        [f"recipe.module={recipe}", "recipe.name=mine", "run_name=t"],
        working_dir=tmp_path / "project",
    )
    (package,) = plan.runtime_env["py_modules"]
    assert Path(package).name == shipped_package_name(recipe)
    assert (Path(package) / "my_cnn.py").read_text() == source.read_text()
    # On a node without the file: the runtime env put the package's parent on sys.path.
    recipe.unlink()
    monkeypatch.syspath_prepend(str(Path(package).parent))
    monkeypatch.delitem(sys.modules, "forge_user_recipe_my_cnn", raising=False)
    module = import_recipe_module(str(recipe))
    assert module.__file__ == str(Path(package) / "my_cnn.py")
    assert hasattr(module, "build")
    monkeypatch.delitem(sys.modules, "forge_user_recipe_my_cnn", raising=False)
    shutil.rmtree(plan.staging)


# ----------------------------------------------------------------------- follow, attach


class FakeClient:
    """The parts of JobSubmissionClient forge uses, scripted."""

    def __init__(self, log: str, statuses: list[str], exit_code: int | None = 0, drops=1):
        self.log, self.statuses, self.code, self.drops = log, list(statuses), exit_code, drops
        self.jobs: dict[str, SimpleNamespace] = {}
        self.submitted: list[dict] = []

    def tail_job_logs(self, job_id):
        log, drop = self.log, self.drops > 0
        self.drops -= 1

        async def gen():
            half = len(log) // 2
            yield log[:half]
            if drop:
                raise ConnectionResetError("stream dropped")
            yield log[half:]

        return gen()

    def get_job_logs(self, job_id):
        return self.log

    def get_job_info(self, job_id):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=status, driver_exit_code=self.code, message="")

    def list_jobs(self):
        return list(self.jobs.values())

    def submit_job(self, **kwargs):
        if kwargs["submission_id"] in self.jobs:
            raise RuntimeError(f"Job with submission_id {kwargs['submission_id']} already exists")
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


def test_follow_reconnects_without_repeating_and_returns_the_outcome() -> None:
    log = "".join(f"step {i}\n" for i in range(20))
    client = FakeClient(log, ["RUNNING", "RUNNING", "SUCCEEDED"], exit_code=0, drops=1)
    out = io.StringIO()
    assert jobs.follow_logs(client, "j", out, poll_s=0) == 0
    assert out.getvalue() == log  # the dropped stream's half is not printed twice


def test_follow_maps_a_config_error_on_the_cluster_to_2() -> None:
    client = FakeClient("forge: configuration error\nneeds 64 GPUs\n", ["FAILED"], exit_code=2)
    out = io.StringIO()
    assert jobs.follow_logs(client, "j", out, poll_s=0) == 2
    assert "needs 64 GPUs" in out.getvalue()


def _plan(**kw) -> jobs.JobPlan:
    base = dict(
        submission_id="forge-exp-1234",
        run_name="exp",
        overrides=["run_name=exp"],
        entrypoint="python -m forge run_name=exp ray.address=auto",
        runtime_env={},
        metadata={},
        upload_bytes=0,
    )
    return jobs.JobPlan(**{**base, **kw})


def test_resubmitting_a_running_run_attaches() -> None:
    client = FakeClient("", ["RUNNING"])
    plan = _plan()
    first = jobs.submit_plan(client, plan)
    assert not first.attached and first.id == "forge-exp-1234"
    client.jobs[first.id] = SimpleNamespace(
        submission_id=first.id, status="RUNNING", entrypoint=plan.entrypoint
    )
    again = jobs.submit_plan(client, plan)
    assert again.attached and again.id == first.id and len(client.submitted) == 1
    with pytest.raises(ClusterError, match="already running .* other overrides"):
        jobs.submit_plan(client, _plan(entrypoint="python -m forge seed=1 ray.address=auto"))
    # Finished (stopped): a new submission is a new attempt of the same run.
    client.jobs[first.id].status = "STOPPED"
    third = jobs.submit_plan(client, plan)
    assert third.id == "forge-exp-1234-r1" and not third.attached


def test_concurrent_submission_of_the_same_run_attaches() -> None:
    client = FakeClient("", ["RUNNING"])
    client.list_jobs = lambda: []  # the other submitter registered after we listed
    client.jobs["forge-exp-1234"] = SimpleNamespace()
    assert jobs.submit_plan(client, _plan()).attached


def test_jobs_cli_list_status_and_stop(monkeypatch, capsys) -> None:
    from forge.jobs_cli import jobs_main

    job = SimpleNamespace(
        submission_id="forge-exp-1234",
        job_id=None,
        status="RUNNING",
        start_time=0,
        metadata={"forge_run_name": "exp"},
        message="Job is currently running.",
        driver_exit_code=None,
    )
    client = FakeClient("", ["RUNNING"])
    client.jobs[job.submission_id] = job
    client.get_job_info = lambda job_id: job
    client.get_job_status = lambda job_id: job.status
    client.stop_job = lambda job_id: setattr(job, "status", "STOPPED") or True
    monkeypatch.setattr(jobs, "make_client", lambda address=None: client)
    assert jobs_main(["list"]) == 0
    assert "forge-exp-1234" in capsys.readouterr().out
    assert jobs_main(["status", "forge-exp-1234"]) == 0
    assert capsys.readouterr().out.startswith("RUNNING")
    assert jobs_main(["stop", "forge-exp-1234"]) == 0
    assert "STOPPED" in capsys.readouterr().err


def test_a_refused_token_is_one_paragraph_not_a_ray_traceback() -> None:
    # Ray raises AuthenticationError (a RayError, not a RuntimeError) for a 401/403.
    from ray.exceptions import AuthenticationError

    def refused() -> None:
        raise AuthenticationError("Authentication required: Unauthorized\n\nset RAY_AUTH_TOKEN")

    with pytest.raises(ClusterError, match="listing the cluster's jobs: Authentication required"):
        jobs._call("listing the cluster's jobs", refused)
