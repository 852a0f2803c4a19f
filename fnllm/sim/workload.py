"""Workloads for the simulator: what arrives when, how long it is.

A workload is a tuple of :class:`WorkItem` sorted by arrival (seconds from
the start). Three sources:

- a JSON-lines file, one ``{"arrival", "prompt_len", "output_len"}`` object
  per line, optionally with ``prompt_token_ids`` (for prefix-cache effects)
  and ``request_id``;
- a synthetic spec, ``"n=2000,rate=8,prompt=U(64,1024),output=U(32,512)"``:
  Poisson arrivals at ``rate`` requests/s, lengths uniform (``U(a,b)``) or
  fixed (an integer), drawn from ``seed``;
- a recorded fnllm trace (its add records: prompt ids, arrival times from
  version 2, output lengths from the recorded samples).

Malformed input raises ``ValueError`` naming the file, line and field.
Prompt ids, when not given, are made up per request so that no two
requests share a prefix block (:func:`prompt_ids`).
"""

from __future__ import annotations

import json
import random
import re
from itertools import repeat
from operator import add, mod

import attrs


@attrs.frozen(kw_only=True)
class WorkItem:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None


def _int_field(d: dict, key: str, where: str, minimum: int = 1) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def item_from_json(d, where: str, default_id: str) -> WorkItem:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    arrival = d.get("arrival")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not arrival >= 0 or arrival == float("inf"):
        raise ValueError(f"{where}: 'arrival' must be a finite number of seconds >= 0, got {arrival!r}")
    ids = d.get("prompt_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"{where}: 'prompt_token_ids' must be a non-empty list of token ids")
        ids = tuple(ids)
    plen = len(ids) if ids is not None and "prompt_len" not in d else _int_field(d, "prompt_len", where)
    if ids is not None and plen != len(ids):
        raise ValueError(f"{where}: 'prompt_len' {plen} differs from len(prompt_token_ids) {len(ids)}")
    rid = d.get("request_id", default_id)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"{where}: 'request_id' must be a string, got {rid!r}")
    return WorkItem(request_id=str(rid), arrival=float(arrival), prompt_len=plen,
                    output_len=_int_field(d, "output_len", where), prompt_token_ids=ids)


def _sorted(items: list[WorkItem], source: str) -> tuple[WorkItem, ...]:
    seen: set[str] = set()
    for it in items:
        if it.request_id in seen:
            raise ValueError(f"{source}: request_id {it.request_id!r} appears twice")
        seen.add(it.request_id)
    if not items:
        raise ValueError(f"{source}: the workload is empty")
    return tuple(sorted(items, key=lambda it: it.arrival))


def read_workload(path: str) -> tuple[WorkItem, ...]:
    """A JSON-lines workload file, or (detected by its header line) an fnllm trace."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    if first.lstrip().startswith('{"type":"header"') or first.lstrip().startswith('{"type": "header"'):
        return workload_from_trace(path)
    items = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {k}: not valid JSON ({e.msg})") from None
        items.append(item_from_json(d, f"{path} line {k}", str(len(items))))
    return _sorted(items, path)


_DIST = re.compile(r"^U\((\d+),(\d+)\)$")


def _length(spec: str, key: str):
    """A sampler for ``U(a,b)`` or a fixed integer."""
    s = spec.replace(" ", "")
    m = _DIST.match(s)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if not 1 <= a <= b:
            raise ValueError(f"--synthetic {key}=U(a,b) needs 1 <= a <= b, got {spec!r}")
        return lambda rng: rng.randint(a, b)
    if s.isdigit() and int(s) >= 1:
        return lambda rng: int(s)
    raise ValueError(f"--synthetic {key} must be U(a,b) or a positive integer, got {spec!r}")


SYNTH_KEYS = ("n", "rate", "prompt", "output", "seed")


def parse_synthetic(spec: str) -> dict:
    """``"n=2000,rate=8,prompt=U(64,1024),output=U(32,512)[,seed=0]"`` as a dict (validated)."""
    out = {"n": 1000, "rate": 8.0, "prompt": "U(64,1024)", "output": "U(32,512)", "seed": 0}
    for part in re.split(r",(?![^()]*\))", spec.strip()):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--synthetic expects key=value items separated by commas, got {part!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in SYNTH_KEYS:
            raise ValueError(f"--synthetic: unknown key {k!r} (known: {', '.join(SYNTH_KEYS)})")
        out[k] = v
    try:
        out["n"], out["seed"], out["rate"] = int(out["n"]), int(out["seed"]), float(out["rate"])
    except ValueError:
        raise ValueError(f"--synthetic: n and seed must be integers and rate a number, got {spec!r}") from None
    if out["n"] < 1 or not out["rate"] > 0 or out["rate"] == float("inf"):
        raise ValueError(f"--synthetic: n must be >= 1 and rate > 0, got {spec!r}")
    _length(out["prompt"], "prompt"), _length(out["output"], "output")
    return out


def synthetic(spec: str | dict, *, rate: float | None = None) -> tuple[WorkItem, ...]:
    """Poisson arrivals with uniform lengths; the same spec and seed give the
    same workload, and changing ``rate`` only rescales the arrival times."""
    p = parse_synthetic(spec) if isinstance(spec, str) else dict(spec)
    rate = p["rate"] if rate is None else rate
    rng = random.Random(p["seed"])
    plen, olen = _length(str(p["prompt"]), "prompt"), _length(str(p["output"]), "output")
    t, items = 0.0, []
    for i in range(p["n"]):
        t += rng.expovariate(1.0)  # unit-rate gaps, scaled below: the same draws at every rate
        items.append(WorkItem(request_id=str(i), arrival=t, prompt_len=plen(rng), output_len=olen(rng)))
    return tuple(attrs.evolve(it, arrival=it.arrival / rate) for it in items)


def scale_rate(work: tuple[WorkItem, ...], factor: float) -> tuple[WorkItem, ...]:
    """The same requests arriving ``factor`` times as fast."""
    return tuple(attrs.evolve(it, arrival=it.arrival / factor) for it in work)


def mean_rate(work: tuple[WorkItem, ...]) -> float:
    span = work[-1].arrival - work[0].arrival
    return (len(work) - 1) / span if span > 0 else float("inf")


def prompt_ids(item: WorkItem, index: int, vocab_size: int, avoid: frozenset = frozenset()) -> tuple[int, ...]:
    """The item's prompt ids, or made-up ones: an arithmetic sequence whose
    start and stride depend on ``index``, so no two requests share a first
    block (no accidental prefix-cache hits); ids in ``avoid`` (EOS) are skipped."""
    if item.prompt_token_ids is not None:
        return item.prompt_token_ids
    lo = 3 if vocab_size > 16 else 0
    span = vocab_size - lo
    a, b = index % span, 1 + (index // span) % max(1, span - 1)
    n = item.prompt_len
    if a + b * (n - 1) < span:  # no wrap-around: a plain range
        out = range(lo + a, lo + a + b * n, b)
    else:
        out = list(map(add, repeat(lo), map(mod, range(a, a + b * n, b), repeat(span))))  # lo + (a + j b) % span
    if avoid and any(map(out.__contains__, avoid)):  # O(1) per id on a range
        out = [t if t not in avoid else lo + (t - lo + 1) % span for t in out]
    return tuple(out)


def workload_to_jsonl(work: tuple[WorkItem, ...]) -> str:
    lines = []
    for it in work:
        d = {"request_id": it.request_id, "arrival": round(it.arrival, 6), "prompt_len": it.prompt_len, "output_len": it.output_len}
        if it.prompt_token_ids is not None:
            d["prompt_token_ids"] = list(it.prompt_token_ids)
        lines.append(json.dumps(d))
    return "".join(line + "\n" for line in lines)


def workload_from_trace(path: str) -> tuple[WorkItem, ...]:
    """A recorded trace as a workload: each add is a request with its prompt
    ids; arrival from the record (version 2; version-1 traces have none and
    everything arrives at 0); output length = tokens the recording generated
    for its longest sample."""
    from fnllm.trace import read_trace

    trace = read_trace(path)
    adds, made = {}, {}
    for ev in trace.events:
        if ev["type"] == "add":
            adds[ev["request"]["request_id"]] = ev
        elif ev["type"] == "step":
            rows = ev.get("rows", {})
            for rid, samples, idx in zip(rows.get("request_ids", []), ev["sampled"], range(len(ev["sampled"]))):
                if samples:
                    made[rid] = made.get(rid, 0) + len(samples)
    if not adds:
        raise ValueError(f"{path}: the trace has no requests")
    t0 = min((ev.get("arrival") for ev in adds.values() if ev.get("arrival") is not None), default=0.0)
    items = []
    for rid, ev in adds.items():
        req = ev["request"]
        n = max(1, req.get("sampling", {}).get("n", 1))
        out = max(1, -(-made.get(rid, 1) // n))
        arr = ev.get("arrival")
        items.append(WorkItem(request_id=rid, arrival=0.0 if arr is None else max(0.0, arr - t0),
                              prompt_len=len(req["prompt_token_ids"]), output_len=out,
                              prompt_token_ids=tuple(req["prompt_token_ids"])))
    return _sorted(items, path)
