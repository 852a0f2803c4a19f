"""Traces: record a run, replay it bit for bit through the pure core.

Format (JSON lines, ``"version": 2``; version 1, the same without
``arrival``, is still read), one record per line, in the order things
happened:

- ``{"type": "header", "version": 2, "config": {...}}``
- ``{"type": "add", "step": s, "request": {...}, "arrival": t}`` (request with its prompt ids and
  sampling; ``t`` the engine clock's reading when it was added, seconds; a workload for ``fnllm simulate``)
- ``{"type": "abort", "step": s, "request_id": ...}``
- ``{"type": "finish", "step": s, "request_id": ..., "index": i}`` (a stop string found by the engine)
- ``{"type": "fault", "step": s, "plan": <digest>, "errors": [request_id, ...]}``: the plan scheduled
  at step ``s`` failed on the device; replay re-plans it, applies
  :func:`~fnllm.faults.repair_after_failure` and ends the isolated requests
- ``{"type": "stage", "step": s, "request_id": ..., "first": j, "count": k}`` (prompt blocks
  ``j .. j+k-1`` of a request read from the disk tier into the host tier)
- ``{"type": "step", "step": s, "plan": <plan digest>, "state": <state digest after commit>,
  "n": <rows>, "sampled": [[...], ...], "logprobs": ... | null, "rows": <the plan>}``, plus
  ``"prompt_logprobs": [[[rank, [[id, lp], ...]], ...], ...]`` when the step computed any

``s`` is the engine's step counter when the event happened; replay applies
an input event with step ``s`` just before step ``s`` is scheduled. Each line is
flushed as written, so a trace of a run that crashed is readable up to its
last complete line. Digests are SHA-256 over a canonical text form, so they
do not depend on Python's hash seed. Replay feeds the events and recorded
device outputs through ``schedule``/``commit`` and compares digests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

import attrs

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from fnllm.faults import repair_after_failure
from fnllm.lifecycle import abort_request, add_request, finish_sequence, initial_state, stage_blocks
from fnllm.schedule import schedule
from fnllm.spec import expected_samples
from fnllm.state import BatchPlan, EngineState, Rejection, Request, SamplingParams, StepOutput
from fnllm.step import commit

VERSION = 2
READABLE_VERSIONS = (1, 2)


# -- digests -----------------------------------------------------------------------


def plan_digest(plan: BatchPlan) -> str:
    return hashlib.sha256(repr(plan).encode()).hexdigest()[:32]


def state_digest(state: EngineState) -> str:
    """A stable digest of everything that decides the future of a run."""
    run, pool = state.running, state.pool
    h = hashlib.sha256()
    for col in (run.seq_ids, run.request_ids, run.indexes, run.num_computed, run.num_tokens, run.num_output, run.tables):
        h.update(repr(col).encode())
    h.update(repr([o[0] if o else None for o in run.outputs]).encode())
    h.update(repr([(s.seq_id, s.request_id, s.index, s.status.value, s.num_output) for s in state.waiting]).encode())
    swapped = [(s.seq_id, s.num_computed, s.swapped) for s in state.waiting if s.swapped]
    if swapped or (pool.host is not None and pool.host.num_blocks):
        host = pool.host
        hc = (host.num_stack, host.fresh, host.num_lru, host.lru_head, host.lru_tail, len(host.hash_of))
        h.update(repr((swapped, hc, sorted(host.ref.items()))).encode())
    h.update(repr(sorted(state.alive.items())).encode())
    h.update(repr((state.next_seq_id, state.next_arrival, state.step)).encode())
    counters = (pool.num_stack, pool.fresh, pool.num_lru, pool.lru_head, pool.lru_tail, len(pool.hash_of))
    h.update(repr((counters, sorted(pool.ref.items()))).encode())
    return h.hexdigest()[:32]


# -- (de)serialisation ---------------------------------------------------------------


def config_to_json(config: EngineConfig) -> dict:
    return attrs.asdict(config)


def config_from_json(d: dict) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(**d["model"]), cache=CacheConfig(**d["cache"]), scheduler=SchedulerConfig(**d["scheduler"]),
        parallel=ParallelConfig(**d.get("parallel", {})), speculative=d.get("speculative"),
    )


def request_to_json(req: Request) -> dict:
    return {
        "request_id": req.request_id,
        "prompt_token_ids": list(req.prompt_token_ids),
        "sampling": _sampling_to_json(req.sampling),
        "priority": req.priority,
        "extra_keys": list(req.extra_keys),
    }


def _sampling_to_json(sp: SamplingParams) -> dict:
    """The init arguments; logit_bias as a JSON object (string keys, read back as ids)."""
    d = attrs.asdict(sp, filter=lambda a, _: a.init)
    d["logit_bias"] = {str(k): v for k, v in sp.logit_bias.items()}
    return d


def request_from_json(d: dict) -> Request:
    return Request(
        request_id=d["request_id"],
        prompt_token_ids=tuple(d["prompt_token_ids"]),
        sampling=SamplingParams(**d["sampling"]),
        priority=d.get("priority", 0),
        extra_keys=tuple(d.get("extra_keys", ())),
    )


def plan_to_json(plan: BatchPlan) -> dict:
    """The plan without its sampling parameters (those are in the add events)."""
    return {
        "seq_ids": list(plan.seq_ids),
        "request_ids": list(plan.request_ids),
        "token_ids": [list(t) for t in plan.token_ids],
        "positions": list(plan.positions),
        "block_tables": [list(t) for t in plan.block_tables],
        "num_samples": list(plan.num_samples),
        "copies": [list(c) for c in plan.copies],
        "swap_out": [list(c) for c in plan.swap_out],
        "swap_in": [list(c) for c in plan.swap_in],
        **({"num_draft_tokens": list(plan.num_draft_tokens)} if plan.num_draft_tokens else {}),
    }


def output_to_json(output: StepOutput) -> dict:
    lps = None
    if output.logprobs is not None:
        lps = [[[list(p) for p in sample] for sample in row] for row in output.logprobs]
    out = {"sampled": [list(s) for s in output.sampled], "logprobs": lps}
    if output.prompt_logprobs is not None:  # [[rank, [[id, lp], ...]], ...] per row
        out["prompt_logprobs"] = [[[rank, [list(p) for p in e]] for rank, e in row] for row in output.prompt_logprobs]
    return out


def output_from_json(d: dict) -> StepOutput:
    lps = d.get("logprobs")
    if lps is not None:
        lps = tuple(tuple(tuple((int(t), float(v)) for t, v in sample) for sample in row) for row in lps)
    plp = d.get("prompt_logprobs")
    if plp is not None:
        plp = tuple(tuple((int(rank), tuple((int(t), float(v)) for t, v in e)) for rank, e in row) for row in plp)
    return StepOutput(sampled=tuple(tuple(s) for s in d["sampled"]), logprobs=lps, prompt_logprobs=plp)


# -- writing and reading --------------------------------------------------------------------


class TraceWriter:
    """The engine's recorder: appends one flushed JSON line per event."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "w", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def start(self, config: EngineConfig) -> None:
        self._write({"type": "header", "version": VERSION, "config": config_to_json(config)})

    def add(self, step: int, request: Request, arrival: float | None = None) -> None:
        rec = {"type": "add", "step": step, "request": request_to_json(request)}
        if arrival is not None:
            rec["arrival"] = arrival
        self._write(rec)

    def abort(self, step: int, request_id: str) -> None:
        self._write({"type": "abort", "step": step, "request_id": request_id})

    def finish(self, step: int, request_id: str, index: int) -> None:
        self._write({"type": "finish", "step": step, "request_id": request_id, "index": index})

    def stage(self, step: int, request_id: str, first: int, count: int) -> None:
        self._write({"type": "stage", "step": step, "request_id": request_id, "first": first, "count": count})

    def step(self, plan: BatchPlan, output: StepOutput, state: EngineState) -> None:
        rec = {"type": "step", "step": plan.step, "plan": plan_digest(plan), "state": state_digest(state), "n": len(plan)}
        rec.update(output_to_json(output))
        rec["rows"] = plan_to_json(plan)
        self._write(rec)

    def fault(self, plan: BatchPlan, errors: list[str]) -> None:
        self._write({"type": "fault", "step": plan.step, "plan": plan_digest(plan), "errors": list(errors)})

    def close(self) -> None:
        self._f.close()


@attrs.frozen
class Trace:
    config: EngineConfig
    events: tuple[dict, ...]
    truncated: bool = False  # the last line was incomplete (a crashed run)


def read_trace(path: str) -> Trace:
    """Read a trace; an incomplete last line (a crash mid-write) is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records, truncated = [], False
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k >= len(lines) - 2:
                truncated = True
                break
            raise ValueError(f"{path}: line {k + 1} is not valid JSON")
    if not records or records[0].get("type") != "header":
        raise ValueError(f"{path}: not an fnllm trace (no header line)")
    if records[0].get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: trace version {records[0].get('version')} is not supported (expected one of {READABLE_VERSIONS})")
    return Trace(config=config_from_json(records[0]["config"]), events=tuple(records[1:]), truncated=truncated)


# -- replay through the pure core ---------------------------------------------------------------


@attrs.frozen
class ReplayStep:
    """One replayed step: the plan and the states around it."""

    step: int
    plan: BatchPlan
    before: EngineState
    after: EngineState
    record: dict


def apply_event(state: EngineState, event: dict, config: EngineConfig) -> EngineState:
    """Apply an input event (add / abort / finish / fault) to ``state``."""
    kind = event["type"]
    if kind == "add":
        out = add_request(state, request_from_json(event["request"]), config)
        if isinstance(out, Rejection):
            raise ValueError(f"recorded add of {out.request_id!r} is rejected on replay: {out.reason}")
        return out
    if kind == "abort":
        return abort_request(state, event["request_id"])
    if kind == "finish":
        return finish_sequence(state, event["request_id"], event["index"])
    if kind == "fault":
        _, plan = schedule(state, config)
        state = repair_after_failure(state, plan, config)
        for rid in event["errors"]:
            state = abort_request(state, rid)
        return state
    if kind == "stage":
        staged, got = stage_blocks(state, event["request_id"], event["first"], event["count"])
        if len(got) != event["count"]:
            raise ValueError(f"recorded stage of {event['count']} blocks of {event['request_id']!r} stages {len(got)} on replay")
        return staged
    raise ValueError(f"unknown trace event type {kind!r}")


def staged_host_blocks(before: EngineState, after: EngineState, event: dict) -> tuple[int, ...]:
    """The host blocks a replayed ``stage`` event named, in block order."""
    req = after.requests[event["request_id"]]
    hashes = req.block_hashes[event["first"] : event["first"] + event["count"]]
    return tuple(after.pool.host.by_hash[h] for h in hashes)


def replay_steps(trace: Trace, config: EngineConfig | None = None, on_stage=None) -> Iterator[ReplayStep]:
    """Re-run the recorded events and device outputs through the pure core,
    yielding every step (digests are compared by the caller). Input events
    are applied by their recorded step number, not their place in the file.
    ``on_stage(state, event, host_blocks)`` is called after each ``stage``
    event with the host blocks it named (a device replay fills them)."""
    config = config or trace.config
    state = initial_state(config)
    inputs = [ev for ev in trace.events if ev["type"] != "step"]
    for ev in trace.events:
        if ev["type"] != "step":
            continue
        for e in [e for e in inputs if e["step"] <= ev["step"]]:
            if e["type"] == "stage" and on_stage is not None:
                was = state
                state = apply_event(state, e, config)
                on_stage(state, e, staged_host_blocks(was, state, e))
                continue
            state = apply_event(state, e, config)
        inputs = [e for e in inputs if e["step"] > ev["step"]]
        before = state
        mid, plan = schedule(before, config)
        output = output_from_json(ev)
        if len(output.sampled) != len(plan) or tuple(map(len, output.sampled)) != expected_samples(plan):
            yield ReplayStep(ev["step"], plan, before, mid, ev)
            return
        state, _ = commit(mid, plan, output, config)
        yield ReplayStep(ev["step"], plan, before, state, ev)
