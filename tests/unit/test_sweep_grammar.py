"""Hydra's sweep grammar -> forge sweep dimensions -> Tune search space, with Hydra's meaning."""

from __future__ import annotations

import pytest

from forge.config.overrides import hydra_value
from forge.errors import ConfigError
from forge.sweep.grammar import has_sweep_expression, parse_sweep, point_overrides


def dim(text: str):
    (d,) = parse_sweep([text]).dims
    return d


def test_comma_list_is_a_grid_axis():
    d = dim("seed=0,1,2")
    assert (d.kind, d.values) == ("grid", (0, 1, 2))
    assert parse_sweep(["seed=0,1,2", "x=a,b"]).grid_size == 6


def test_choice_is_sampled():
    d = dim("recipe.params.channels=choice(8,16,32)")
    assert (d.kind, d.values) == ("choice", (8, 16, 32))
    assert parse_sweep(["recipe.params.channels=choice(8,16,32)"]).grid_size == 1


def test_range_excludes_stop_like_python():
    assert dim("x=range(1,5)").values == (1, 2, 3, 4)
    assert dim("x=range(0,10,3)").values == (0, 3, 6, 9)
    assert dim("x=range(5,0,-2)").values == (5, 3, 1)
    assert dim("x=range(1,5)").kind == "grid"


def test_float_range_is_exact_and_excludes_stop():
    # Hydra's own iterator gives [0.1, 0.2, 0.30000000000000004, 0.4]: wrong twice.
    assert dim("x=range(0.1,0.4,0.1)").values == (0.1, 0.2, 0.3)
    values = dim("x=range(0,1,0.1)").values
    assert values == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert all(isinstance(v, float) for v in values)


@pytest.mark.parametrize("text", ["x=range(5,1)", "x=range(1,2,-1)", "x=range(1,1)"])
def test_empty_range_refused(text):
    with pytest.raises(ConfigError, match="is empty"):
        parse_sweep([text])


def test_zero_step_refused():
    with pytest.raises(ConfigError, match="must not be 0"):
        parse_sweep(["x=range(1,2,0)"])


def test_interval_is_uniform_float_unless_int():
    d = dim("optim.lr=interval(0.1,0.5)")
    assert (d.kind, d.low, d.high, d.log, d.integer) == ("uniform", 0.1, 0.5, False, False)
    d = dim("x=interval(1,10)")  # Hydra casts interval ends to float
    assert not d.integer and isinstance(d.low, float)
    d = dim("x=int(interval(1,10))")
    assert d.integer and (d.low, d.high) == (1, 10)


def test_tag_log_is_log_uniform():
    d = dim("optim.lr=tag(log,interval(1e-4,1e-1))")
    assert d.log and not d.integer and (d.low, d.high) == (1e-4, 1e-1)
    d = dim("x=tag(log,int(interval(1,64)))")
    assert d.log and d.integer


@pytest.mark.parametrize(
    "text,match",
    [
        ("x=interval(0.5,0.1)", "inverted"),
        ("x=interval(1,1)", "empty"),
        ("x=tag(log,interval(0,1))", "low > 0"),
        ("x=shuffle(1,2)", "shuffle"),
        ("x=glob(*)", "not supported"),
    ],
)
def test_bad_expressions_refused(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep([text])


def test_to_tune_maps_every_kind():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    assert dim("seed=0,1").to_tune() == tune.grid_search([0, 1])
    assert isinstance(dim("seed=0,1").to_tune(as_grid=False), Categorical)
    assert dim("x=choice(a,b)").to_tune().categories == ["a", "b"]
    u = dim("x=interval(0.1,0.5)").to_tune()
    assert isinstance(u, Float) and (u.lower, u.upper) == (0.1, 0.5)
    assert type(u.get_sampler()).__name__ == "_Uniform"
    lg = dim("x=tag(log,interval(1e-4,1e-1))").to_tune()
    assert type(lg.get_sampler()).__name__ == "_LogUniform"
    i = dim("x=int(interval(1,8))").to_tune()
    # Tune's randint excludes its upper bound; Hydra's int interval includes 8.
    assert isinstance(i, Integer) and (i.lower, i.upper) == (1, 9)
    samples = {i.sample() for _ in range(400)}
    assert samples == set(range(1, 9))


def test_plain_overrides_kept_in_order_and_prefixes_survive():
    p = parse_sweep(["experiment=digits", "+recipe.params.x=choice(1,2)", "trainer.max_steps=9"])
    assert p.base == ("experiment=digits", "trainer.max_steps=9")
    assert p.dims[0].name == "recipe.params.x"
    assert point_overrides(p, {"recipe.params.x": 2})[-1] == "+recipe.params.x=2"


def test_values_round_trip_through_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    # Strings that Hydra would read as something else unquoted: nan and inf (floats), null.
    strings = ("adamw", "a b", "it's", "null", "nan", "inf", "NaN", "v1:2", "x@y", "1e-5")
    for value in (3, 0.1, 1e-5, True, None, [1, 2], *strings):
        parsed = parser.parse_override(f"k={hydra_value(value)}").value()
        assert parsed == (list(value) if isinstance(value, list) else value), value


def test_has_sweep_expression():
    assert has_sweep_expression(["seed=0,1", "a=3", "b=interval(0,1)"]) == [
        "seed=0,1",
        "b=interval(0,1)",
    ]
    assert has_sweep_expression(["a=[1,2]", "b='x,y'"]) == []


def test_same_key_twice_refused():
    with pytest.raises(ConfigError, match="swept twice"):
        parse_sweep(["seed=0,1", "seed=choice(2,3)"])
