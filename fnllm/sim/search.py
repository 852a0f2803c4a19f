"""Sweeps and SLO search over simulated runs.

- ``--sweep key=v1,v2,...`` (repeatable; the cartesian product of all
  sweeps): ``key`` is a config key as replay's ``--set`` takes it
  (``max_num_seqs``, ``cache.block_size``, ...), or ``tp`` / ``pp`` (the cost
  model's parallelism; a roofline profile re-sizes the KV cache for it), or
  ``rate`` (requests/s: a synthetic workload is redrawn at that rate, a file
  workload's arrivals are rescaled to it).
- ``--slo "ttft_p99=2,tpot_p99=0.1"``: for each configuration, the highest
  rate whose run meets every ``metric <= limit``, by doubling until a rate
  fails and then bisecting (Vidur-Search's procedure). The rates are those of
  the workload's own arrival process (same draws, rescaled).
"""

from __future__ import annotations

import itertools
from typing import Callable

import attrs

from fnllm.config import EngineConfig
from fnllm.sim.cost import CostModel
from fnllm.sim.workload import mean_rate, scale_rate, synthetic

COST_KEYS = ("tp", "pp")


def parse_assignments(items: list[str], flag: str = "--set") -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip() or not v.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def parse_sweeps(items: list[str]) -> list[dict]:
    """Every combination of the ``--sweep key=v1,v2`` items, as assignment dicts."""
    axes = []
    for key, values in parse_assignments(items, "--sweep").items():
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--sweep {key}= needs at least one value")
        axes.append([(key, v) for v in vals])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def parse_slo(spec: str) -> dict:
    """``"ttft_p99=2,tpot_p99=0.1"`` -> ``{"ttft_p99_s": 2.0, "tpot_p99_s": 0.1}``."""
    from fnllm.sim.report import metrics

    known = set(metrics({}, {}, {}, {}))
    out = {}
    for k, v in parse_assignments([p for p in spec.split(",") if p.strip()], "--slo").items():
        name = k if k in known else f"{k}_s"
        if name not in known or not name.startswith(("ttft", "tpot")):
            raise ValueError(f"--slo: unknown metric {k!r} (use ttft_mean, ttft_p50, ttft_p90, ttft_p99, tpot_mean, tpot_p99)")
        try:
            out[name] = float(v)
        except ValueError:
            raise ValueError(f"--slo {k} must be a number of seconds, got {v!r}") from None
        if not out[name] > 0:
            raise ValueError(f"--slo {k} must be > 0, got {v!r}")
    if not out:
        raise ValueError("--slo needs at least one metric=limit")
    return out


def _int(key: str, value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return v


@attrs.frozen
class Setup:
    """One configuration to simulate: engine config, cost model, workload maker."""

    config: EngineConfig
    cost: CostModel
    rate: float | None  # None: the workload as given


def resolve(base_config: EngineConfig | None, cost: CostModel, assignment: dict) -> Setup:
    """Apply ``--set``/``--sweep`` assignments: tp/pp to the cost model (a
    roofline re-sizes the KV pool), rate to the workload, the rest to the config."""
    from fnllm.replay import override_config

    cost = cost.with_parallel(
        tp=_int("tp", assignment["tp"]) if "tp" in assignment else None,
        pp=_int("pp", assignment["pp"]) if "pp" in assignment else None,
    )
    config = cost.engine_config() or base_config or EngineConfig()
    rate = None
    if "rate" in assignment:
        try:
            rate = float(assignment["rate"])
        except ValueError:
            raise ValueError(f"rate must be a number of requests per second, got {assignment['rate']!r}") from None
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {assignment['rate']!r}")
    rest = {k: v for k, v in assignment.items() if k not in COST_KEYS + ("rate",)}
    return Setup(config=override_config(config, rest) if rest else config, cost=cost, rate=rate)


def workload_at(source, rate: float | None):
    """``source``: a synthetic spec dict or a tuple of WorkItems."""
    if isinstance(source, dict):
        return synthetic(source, rate=rate)
    if rate is None:
        return source
    return scale_rate(source, rate / mean_rate(source))


def meets(m: dict, slo: dict) -> bool:
    return all(m.get(k) is not None and m[k] == m[k] and m[k] <= lim for k, lim in slo.items())


def max_rate(run: Callable[[float], dict], slo: dict, *, start: float = 1.0, iters: int = 8,
             limit: float = 1e6) -> tuple[float, dict | None]:
    """The highest rate meeting ``slo``: from ``start``, double (or halve)
    until the outcome flips, then bisect ``iters`` times between the last
    passing and the first failing rate. ``(0.0, None)`` when even
    ``start / 1024`` fails."""
    m = run(start)
    if meets(m, slo):
        lo, lo_m, r = start, m, start * 2
        while True:
            if r > limit:
                return lo, lo_m
            m = run(r)
            if not meets(m, slo):
                hi = r
                break
            lo, lo_m, r = r, m, r * 2
    else:
        hi, r = start, start / 2
        while True:
            if r < start / 1024:
                return 0.0, None
            m = run(r)
            if meets(m, slo):
                lo, lo_m = r, m
                break
            hi, r = r, r / 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = run(mid)
        if meets(m, slo):
            lo, lo_m = mid, m
        else:
            hi = mid
    return lo, lo_m
