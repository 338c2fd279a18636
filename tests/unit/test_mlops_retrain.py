"""The retraining run goes through forge.submit when a job server is configured (no cluster
here: submission itself is tested in test_jobs.py; a fake handle stands in for the job)."""

from __future__ import annotations

import json

import pytest

import forge
from forge.errors import ClusterError
from forge.mlops.retrain import train_challenger
from forge.mlops.specs import RetrainSpec


class FakeHandle:
    def __init__(self, status: str) -> None:
        self.id = "forge-tabular-retrain-0"
        self._status = status
        self.waited_with = None

    def wait(self, timeout_s=None, poll_s=2.0):
        self.waited_with = timeout_s
        return self._status


def _fake_submit(tmp_path, status, calls):
    def submit(overrides, address=None, **kwargs):
        calls.append((list(overrides), address))
        run = next(o.partition("=")[2] for o in overrides if o.startswith("run_name="))
        folder = tmp_path / "runs" / run
        folder.mkdir(parents=True)
        rows = [{"step": 100, "val/accuracy": 0.7}, {"step": 200, "val/accuracy": 0.8}]
        text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 3'  # a torn last line
        (folder / "metrics.jsonl").write_text(text)
        calls.append(FakeHandle(status))
        return calls[-1]

    return submit


def test_retraining_is_submitted_as_a_job_when_an_address_is_set(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(forge, "submit", _fake_submit(tmp_path, "SUCCEEDED", calls))
    monkeypatch.setattr(forge, "train", lambda *a, **k: pytest.fail("trained locally"))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    spec = RetrainSpec(address="http://head:8265", job_timeout_s=600)
    overrides = ["experiment=tabular", f"storage.uri={tmp_path / 'runs'}"]
    run = train_challenger(overrides, spec)
    (sent, address), handle = calls[0], calls[1]
    assert address == "http://head:8265" and handle.waited_with == 600
    run_name = next(o.partition("=")[2] for o in sent if o.startswith("run_name="))
    assert run_name.startswith("tabular-retrain-")
    assert run.run_dir == str(tmp_path / "runs" / run_name)
    assert run.metrics == {"val/accuracy": 0.8}  # the last value, torn line ignored


def test_the_environment_address_is_used_and_a_failed_job_keeps_the_champion(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(forge, "submit", _fake_submit(tmp_path, "FAILED", calls))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://env-head:8265")
    overrides = ["experiment=tabular", f"storage.uri={tmp_path / 'runs'}", "run_name=r1"]
    with pytest.raises(ClusterError, match="ended FAILED; the champion stays"):
        train_challenger(overrides, RetrainSpec())
    assert calls[0][1] == "http://env-head:8265"
    assert calls[0][0].count("run_name=r1") == 1  # the user's run_name is kept, not added


def test_without_an_address_it_trains_here(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setattr(forge, "submit", lambda *a, **k: pytest.fail("submitted"))

    class Result:
        run_dir, metrics = "/runs/local", {"val/accuracy": 0.9}

    monkeypatch.setattr(forge, "train", lambda overrides, console=None: Result())
    run = train_challenger(["experiment=tabular"], RetrainSpec())
    assert run.run_dir == "/runs/local" and run.metrics == {"val/accuracy": 0.9}
