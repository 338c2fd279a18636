"""Multi-node pieces without Ray: placement key, shared storage rule, run.json, recipe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.cluster import local_storage_problem
from forge.config.compose import compose
from forge.config.specs import StorageSpec
from forge.config.validate import to_run_spec
from forge.errors import ConfigError


def test_placement_strategy_is_validated() -> None:
    spec = to_run_spec(compose(["scaling.placement_strategy=STRICT_SPREAD"]))
    assert spec.scaling.placement_strategy == "STRICT_SPREAD"
    assert to_run_spec(compose([])).scaling.placement_strategy == "PACK"
    with pytest.raises(ConfigError, match="placement_strategy"):
        to_run_spec(compose(["scaling.placement_strategy=SPRAED"]))


@pytest.mark.parametrize(
    "uri, shared, hosts, refused",
    [
        ("runs", False, ["10.0.0.1", "10.0.0.2"], True),
        ("/mnt/runs", False, ["10.0.0.1", "10.0.0.2"], True),
        ("file:///mnt/runs", False, ["10.0.0.1", "10.0.0.2"], True),
        ("/mnt/nfs/runs", True, ["10.0.0.1", "10.0.0.2"], False),  # declared shared (NFS)
        ("s3://bucket/runs", False, ["10.0.0.1", "10.0.0.2"], False),
        ("runs", False, ["10.0.0.1"], False),  # raylets on one machine share its disk
    ],
)
def test_local_storage_on_several_machines(uri, shared, hosts, refused) -> None:
    problem = local_storage_problem(StorageSpec(uri=uri, shared=shared), hosts)
    assert (problem is not None) == refused
    if refused:
        assert "storage.shared=true" in problem and "s3://" in problem
        assert "2 machines" in problem


def test_run_json_records_each_ranks_node(tmp_path: Path) -> None:
    from forge.run_folder import record_placement

    (tmp_path / "run.json").write_text(json.dumps({"seed": 3}))
    ranks = [
        {"rank": 1, "node_id": "b", "node_ip": "10.0.0.2"},
        {"rank": 0, "node_id": "a", "node_ip": "10.0.0.1"},
    ]
    record_placement(str(tmp_path), ranks)
    record_placement(str(tmp_path), ranks[:1] + [{"rank": 0, "node_id": "b"}])  # a restart
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["seed"] == 3
    assert [r["node_id"] for r in info["ranks"]] == ["b", "b"]
    assert info["nodes"] == 1
    assert [len(p["ranks"]) for p in info["placements"]] == [2, 2]
    assert [r["rank"] for r in info["placements"][0]["ranks"]] == [0, 1]


@pytest.mark.parametrize("hosts", [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"]])
def test_a_recipe_file_is_read_in_place_on_one_machine_and_refused_on_several(
    tmp_path: Path, monkeypatch, hosts: list[str]
) -> None:
    """Ray takes local py_modules only at the job level; a worker group's env refuses them."""
    import ray

    from forge.errors import ConfigError
    from forge.launch import _ship_recipe_file

    source = Path(__file__).resolve().parents[2] / "recipes" / "digits.py"
    (tmp_path / "mine.py").write_text(source.read_text())
    monkeypatch.chdir(tmp_path)
    nodes = [{"NodeManagerAddress": h, "Alive": True} for h in hosts]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    spec = to_run_spec(compose(["recipe.module=mine.py", "recipe.name=mine"]))
    if len(hosts) > 1:
        with pytest.raises(ConfigError, match="forge submit"):
            _ship_recipe_file(spec)
        return
    shipped, env, staging = _ship_recipe_file(spec)
    assert shipped.recipe.module == str(tmp_path / "mine.py")  # absolute: same name everywhere
    assert env == {} and staging is None
    plain = to_run_spec(compose([]))
    assert _ship_recipe_file(plain) == (plain, {}, None)
