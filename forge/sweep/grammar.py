"""Hydra's sweep grammar -> search dimensions (Ray-free) -> a Ray Tune search space.

Hydra's own override parser reads the command line, so every expression means what it means in
Hydra (https://hydra.cc/docs/advanced/override_grammar/extended/):

==================================  ============================  ===============================
Override                            Hydra meaning                 Tune search space
==================================  ============================  ===============================
``seed=0,1,2``                      comma list: a grid axis       ``tune.grid_search([0, 1, 2])``
``x=range(0,1,0.25)``               ``[0, 0.25, 0.5, 0.75]``,     ``tune.grid_search([...])``
                                    *stop excluded* (Python's)
``x=choice(8,16,32)``               one value, sampled            ``tune.choice([8, 16, 32])``
``x=interval(0.1,0.5)``             float in [a, b]               ``tune.uniform(0.1, 0.5)``
``x=int(interval(1,8))``            int in [a, b], both ends      ``tune.randint(1, 9)``
``x=tag(log,interval(1e-4,1e-1))``  log-uniform float             ``tune.loguniform(1e-4, 1e-1)``
``x=tag(log,int(interval(1,64)))``  log-uniform int, both ends    ``tune.lograndint(1, 65)``
==================================  ============================  ===============================

A grid axis multiplies the number of trials (each grid point runs ``sweep.num_samples`` times);
sampled dimensions are drawn once per trial. Float ranges are computed in decimal arithmetic, so
``range(0.1,0.4,0.1)`` is ``[0.1, 0.2, 0.3]`` (Hydra's own float accumulation yields
``0.30000000000000004`` and also the excluded ``0.4``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from forge.config.overrides import hydra_value
from forge.errors import ConfigError

Kind = Literal["grid", "choice", "uniform"]


@dataclass(frozen=True)
class Dimension:
    """One swept key.

    Attributes:
        key: The config key as written, with its prefix (``optim.lr``, ``+recipe.params.x``).
        kind: ``grid`` (comma list or range), ``choice`` (sampled from ``values``) or
            ``uniform`` (sampled from [low, high]).
        values: The values of a grid or choice dimension.
        low, high: The ends of a uniform dimension (both included).
        log: Sample uniformly in log space.
        integer: Sample integers.
        text: The override as the user wrote it (for messages and best.yaml).
    """

    key: str
    kind: Kind
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    text: str = ""

    @property
    def name(self) -> str:
        """The key without Hydra's ``+``/``++``/``~`` prefix (a Tune config key)."""
        return self.key.lstrip("+~")

    def probe_values(self) -> list[Any]:
        """The values every trial could see at the edges: each listed value, or both ends."""
        if self.kind == "uniform":
            return [self.low, self.high]
        return list(self.values)

    def to_tune(self, as_grid: bool = True) -> Any:
        """This dimension as a Tune search-space object (imports ray.tune).

        Args:
            as_grid: Grid axes become ``tune.grid_search``; False makes them ``tune.choice``
                (for searchers such as Optuna that cannot enumerate a grid).
        """
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values)) if as_grid else tune.choice(self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.integer:
            # Tune's upper bound is exclusive; Hydra's (and Optuna's) int interval includes it.
            high = int(self.high) + 1
            return (
                tune.lograndint(int(self.low), high)
                if self.log
                else tune.randint(int(self.low), high)
            )
        return (
            tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)
        )


@dataclass(frozen=True)
class ParsedSweep:
    """A sweep command line split into fixed overrides and swept dimensions."""

    base: tuple[str, ...]
    dims: tuple[Dimension, ...]

    @property
    def grid_size(self) -> int:
        """Grid points (the product of every grid axis' length; 1 without grid axes)."""
        return math.prod(len(d.values) for d in self.dims if d.kind == "grid")


def parse_sweep(overrides: Sequence[str]) -> ParsedSweep:
    """Split overrides into plain ones and sweep dimensions, with Hydra's parser.

    Args:
        overrides: Hydra overrides as typed on the command line.

    Returns:
        The fixed overrides (in order) and one :class:`Dimension` per swept key.

    Raises:
        ConfigError: An override does not parse, a range is empty or has step 0, an interval is
            inverted (or not positive under ``tag(log, ...)``), or an expression has no Tune
            equivalent (``glob``, ``shuffle``).

    Example:
        >>> s = parse_sweep(["seed=0,1", "optim.lr=tag(log,interval(1e-4,1e-1))", "data.shuffle=0"])
        >>> s.base
        ('data.shuffle=0',)
        >>> [(d.name, d.kind, d.values, d.log) for d in s.dims]
        [('seed', 'grid', (0, 1), False), ('optim.lr', 'uniform', (), True)]
        >>> parse_sweep(["x=range(0.1,0.4,0.1)"]).dims[0].values
        (0.1, 0.2, 0.3)
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    base: list[str] = []
    dims: list[Dimension] = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as exc:
            raise ConfigError(
                f"Could not parse the override {text!r}: {str(exc).splitlines()[0]} Sweep "
                "expressions look like key=a,b,c  key=choice(a,b)  key=range(start,stop,step)  "
                "key=interval(low,high)  key=tag(log,interval(low,high))."
            ) from None
        if not override.is_sweep_override():
            base.append(text)
            continue
        key = override.get_key_element()
        value = override.value()
        if any(d.key == key for d in dims):
            raise ConfigError(f"{key} is swept twice ({text!r}); give it one sweep expression.")
        if isinstance(value, ChoiceSweep):
            if value.shuffle:
                raise ConfigError(
                    f"{text}: shuffle(...) has no meaning in a Tune sweep (trials run "
                    "concurrently, not in order). Use a comma list or choice(...)."
                )
            kind: Kind = "grid" if value.simple_form else "choice"
            dims.append(Dimension(key, kind, values=tuple(value.list), text=text))
        elif isinstance(value, RangeSweep):
            dims.append(Dimension(key, "grid", values=materialize_range(key, value), text=text))
        elif isinstance(value, IntervalSweep):
            dims.append(interval_dimension(key, value, text))
        else:
            raise ConfigError(
                f"{text}: {type(value).__name__} sweeps are not supported by forge's Tune "
                "sweeper. Use a comma list, choice, range or interval."
            )
    return ParsedSweep(tuple(base), tuple(dims))


def materialize_range(key: str, sweep: Any) -> tuple[Any, ...]:
    """``range(start, stop, step)`` as Python's range: ``stop`` excluded, floats exact.

    Example:
        >>> from hydra.core.override_parser.types import RangeSweep
        >>> materialize_range("x", RangeSweep(start=1, stop=4, step=1))
        (1, 2, 3)
        >>> materialize_range("x", RangeSweep(start=0, stop=1, step=0.25))
        (0.0, 0.25, 0.5, 0.75)
    """
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step == 0:
        raise ConfigError(f"{key}=range({start},{stop},{step}): the step must not be 0.")
    is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step))
    # str() round trip: Decimal(0.1) would carry the binary error we want to avoid.
    d_start, d_stop, d_step = (Decimal(str(v)) for v in (start, stop, step))
    count = math.ceil((d_stop - d_start) / d_step)
    if count <= 0:
        direction = "increasing" if step > 0 else "decreasing"
        raise ConfigError(
            f"{key}=range({start},{stop},{step}) is empty: with step {step} the values are "
            f"{direction} and never reach {stop} from {start} (stop is excluded, as in Python's "
            f"range). Swap start and stop, or flip the step's sign."
        )
    values = [d_start + i * d_step for i in range(count)]
    return tuple(int(v) if is_int else float(v) for v in values)


def interval_dimension(key: str, sweep: Any, text: str) -> Dimension:
    """A uniform dimension from ``interval``/``int(interval)``/``tag(log, ...)``."""
    low, high = sweep.start, sweep.end
    integer = isinstance(low, int) and isinstance(high, int)
    log = "log" in (sweep.tags or set())
    if not low < high:
        raise ConfigError(
            f"{text}: the interval is {'empty' if low == high else 'inverted'} ({low} to "
            f"{high}). Write interval(low,high) with low < high."
        )
    if log and low <= 0:
        raise ConfigError(
            f"{text}: a log-uniform interval needs low > 0 (got {low}). Use a positive low end, "
            "or drop tag(log, ...)."
        )
    return Dimension(key, "uniform", low=low, high=high, log=log, integer=integer, text=text)


def point_overrides(parsed: ParsedSweep, values: dict[str, Any]) -> list[str]:
    """The overrides of one trial: the fixed ones, then each swept key at its value.

    Example:
        >>> p = parse_sweep(["seed=0,1", "+recipe.params.x=choice(a,b)"])
        >>> point_overrides(p, {"seed": 1, "recipe.params.x": "b"})
        ['seed=1', '+recipe.params.x=b']
    """
    out = list(parsed.base)
    for dim in parsed.dims:
        out.append(f"{dim.key}={hydra_value(values[dim.name])}")
    return out


def has_sweep_expression(overrides: Sequence[str]) -> list[str]:
    """The overrides that are sweep expressions (so a run without ``-m`` can refuse them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    found = []
    for text in overrides:
        try:
            if parser.parse_override(text).is_sweep_override():
                found.append(text)
        except HydraException:
            continue  # not ours to report: composition explains parse errors
    return found
