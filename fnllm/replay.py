"""Replay debugging on top of :mod:`fnllm.trace`.

- :func:`verify`: replay through the pure core; the first step whose plan or
  state digest differs from the recording, with a readable plan diff.
- :func:`verify_device`: re-execute the replayed plans on an executor; the
  first sampled token (or logprob) that differs.
- :func:`state_at` / :func:`format_state`: time travel to any step.
- :func:`what_if`: the recorded input events under another config, driven by
  an executor, and what changed per request.
- :func:`compare_traces`: the first step where two traces differ.
"""

from __future__ import annotations

from typing import Callable

import attrs

from fnllm.blocks import free_blocks
from fnllm.config import EngineConfig
from fnllm.lifecycle import initial_state
from fnllm.schedule import schedule
from fnllm.state import EngineState, Executor, StepOutput
from fnllm.step import commit
from fnllm.trace import Trace, apply_event, plan_digest, plan_to_json, replay_steps, state_digest


@attrs.frozen
class Divergence:
    step: int
    kind: str  # "plan" | "state" | "rows" | "token" | "logprob" | "trace"
    request_ids: tuple[str, ...]
    detail: str

    def __str__(self) -> str:
        ids = ", ".join(self.request_ids) or "-"
        return f"step {self.step}: {self.kind} differs (requests: {ids})\n{self.detail}"


def diff_plans(expected: dict, actual: dict) -> tuple[tuple[str, ...], str]:
    """Request ids involved and readable lines for two plans in trace form."""
    lines, involved = [], []
    exp_rows = dict(zip(expected.get("seq_ids", []), range(len(expected.get("seq_ids", [])))))
    act_rows = dict(zip(actual["seq_ids"], range(len(actual["seq_ids"]))))
    for sid in sorted(set(exp_rows) | set(act_rows)):
        e, a = exp_rows.get(sid), act_rows.get(sid)
        rid = (expected["request_ids"][e] if e is not None else actual["request_ids"][a])
        if e is None or a is None:
            lines.append(f"  seq {sid} ({rid!r}): {'only in replay' if e is None else 'only in recording'}")
            involved.append(rid)
            continue
        for key in ("token_ids", "positions", "block_tables", "num_samples"):
            if expected[key][e] != actual[key][a]:
                lines.append(f"  seq {sid} ({rid!r}) {key}: recorded {expected[key][e]} replayed {actual[key][a]}")
                involved.append(rid)
    for key in ("copies", "swap_out", "swap_in"):
        if expected.get(key, []) != actual.get(key, []):
            lines.append(f"  {key}: recorded {expected.get(key, [])} replayed {actual.get(key, [])}")
    if not lines:
        lines.append("  (same rows; the difference is in the sampling parameters)")
    return tuple(dict.fromkeys(involved)), "\n".join(lines)


def verify(trace: Trace) -> Divergence | None:
    """Replay without a device: None when every plan and state digest matches."""
    steps = [e for e in trace.events if e["type"] == "step"]
    n = 0
    for rs in replay_steps(trace):
        rec = rs.record
        n += 1
        if len(rs.plan) != rec["n"] or plan_digest(rs.plan) != rec["plan"]:
            ids, text = diff_plans(rec.get("rows", {"seq_ids": [], "request_ids": []}), plan_to_json(rs.plan))
            return Divergence(rs.step, "plan", ids, text)
        if state_digest(rs.after) != rec["state"]:
            return Divergence(rs.step, "state", tuple(rs.plan.request_ids), "  the state after commit differs")
    if n != len(steps):
        return Divergence(steps[n]["step"] if n < len(steps) else -1, "trace", (), "  replay ended early")
    return None


def _first_token_diff(step: int, plan, expected: StepOutput, actual: StepOutput, tol: float) -> Divergence | None:
    for r, (e, a) in enumerate(zip(expected.sampled, actual.sampled)):
        for j, (te, ta) in enumerate(zip(e, a)):
            if te != ta:
                pos = plan.output_pos[r]
                detail = f"  request {plan.request_ids[r]!r} sample {plan.sample_index[r] + j} output position {pos}: expected token {te}, got {ta}"
                return Divergence(step, "token", (plan.request_ids[r],), detail)
    if expected.prompt_logprobs is not None and actual.prompt_logprobs is not None:
        for r, (e, a) in enumerate(zip(expected.prompt_logprobs, actual.prompt_logprobs)):
            for (_, se), (_, sa) in zip(e, a):
                if any(abs(x[1] - y[1]) > tol or x[0] != y[0] for x, y in zip(se, sa)):
                    return Divergence(step, "logprob", (plan.request_ids[r],), f"  prompt: expected {se}, got {sa}")
    if expected.logprobs is not None and actual.logprobs is not None:
        for r, (e, a) in enumerate(zip(expected.logprobs, actual.logprobs)):
            for se, sa in zip(e, a):
                if any(abs(x[1] - y[1]) > tol or x[0] != y[0] for x, y in zip(se, sa)):
                    return Divergence(step, "logprob", (plan.request_ids[r],), f"  expected {se}, got {sa}")
    return None


def verify_device(trace: Trace, executor: Executor, *, logprob_tol: float = 1e-4, on_stage=None) -> Divergence | None:
    """Re-execute every replayed plan; the first output that differs from the
    recording. A trace with disk-tier reads (``stage`` events) needs
    ``on_stage`` to fill the host blocks they name (e.g.
    :func:`fnllm.offload.replay_stager`); without it, ``ValueError``."""
    from fnllm.trace import output_from_json

    if on_stage is None and any(e["type"] == "stage" for e in trace.events):
        raise ValueError("the trace reads KV blocks from a disk tier: re-executing it needs that directory "
                         "(fnllm replay --kv-offload-dir DIR)")
    for rs in replay_steps(trace, on_stage=on_stage):
        if not len(rs.plan):
            continue
        got = executor.execute(rs.plan)
        d = _first_token_diff(rs.step, rs.plan, output_from_json(rs.record), got, logprob_tol)
        if d is not None:
            return d
    return None


def state_at(trace: Trace, step: int) -> EngineState:
    """The state after step ``step`` was committed (the input of step ``step + 1``)."""
    state = None
    for rs in replay_steps(trace):
        if rs.step > step:
            break
        state = rs.after
    if state is None:
        raise ValueError(f"the trace has no step {step}")
    return state


def format_state(state: EngineState, config: EngineConfig) -> str:
    """A readable account: queues, sequences, pool usage, prefix-cache entries."""
    run, pool = state.running, state.pool
    lines = [
        f"step {state.step}: {len(state.requests)} live requests, {len(run)} running, {len(state.waiting)} waiting",
        f"pool: {pool.num_blocks} blocks of {pool.block_size} tokens; {pool.num_blocks - pool.num_free} in use, "
        f"{pool.num_free} free ({pool.num_lru} cached and evictable); {len(pool.hash_of)} prefix-cache entries",
    ]
    host = pool.host
    if host is not None and host.num_blocks:
        lines.append(
            f"host tier: {host.num_blocks} blocks; {host.num_blocks - host.num_free} hold swapped sequences, "
            f"{host.num_lru} cached and evictable ({len(host.hash_of)} prefix-cache entries)"
        )
    lines.append("running:")
    for i in range(len(run)):
        lines.append(
            f"  seq {run.seq_ids[i]} request {run.request_ids[i]!r}[{run.indexes[i]}]: "
            f"computed {run.num_computed[i]}/{run.num_tokens[i]} tokens, {run.num_output[i]} generated, "
            f"blocks {list(run.tables[i])}"
        )
    lines.append("waiting:")
    for s in state.waiting:
        swapped = f", {s.num_computed} tokens in host blocks {list(s.swapped)}" if s.swapped else ""
        lines.append(
            f"  seq {s.seq_id} request {s.request_id!r}[{s.index}] ({s.status.value}), {s.num_output} generated{swapped}"
        )
    lines.append(f"free blocks (allocation order, first 32): {free_blocks(pool)[:32]}")
    return "\n".join(lines)


@attrs.frozen
class RunSummary:
    """Per request: (finish step, tokens by sample index); and preemptions."""

    finish_step: dict
    tokens: dict
    preemptions: int
    steps: int


def run_events(trace: Trace, config: EngineConfig, executor: Executor, max_steps: int = 100_000) -> RunSummary:
    """Drive the recorded input events (at their recorded steps) through
    ``config`` with ``executor`` producing outputs, until nothing is live."""
    inputs = sorted((e for e in trace.events if e["type"] in ("add", "abort")), key=lambda e: e["step"])
    state, k, preempt = initial_state(config), 0, 0
    finish, tokens = {}, {}
    while (k < len(inputs) or state.requests) and state.step < max_steps:
        while k < len(inputs) and inputs[k]["step"] <= state.step:
            state = apply_event(state, inputs[k], config)
            k += 1
        was = set(state.running.seq_ids)
        mid, plan = schedule(state, config)
        preempt += sum(1 for s in mid.waiting if s.seq_id in was)
        out = executor.execute(plan) if plan.has_device_work else StepOutput()
        state, news = commit(mid, plan, out, config)
        for o in news:
            tokens.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.new_token_ids)
            if o.request_finished:
                finish[o.request_id] = plan.step
    return RunSummary(finish, tokens, preempt, state.step)


def what_if(
    trace: Trace, overrides: dict, make_executor: Callable[[EngineConfig], Executor]
) -> tuple[RunSummary, RunSummary, EngineConfig]:
    """The recorded inputs under the recorded config and under ``overrides``
    (``{"cache.block_size": 8, "max_num_seqs": 4, ...}``), each with a fresh executor."""
    changed = override_config(trace.config, overrides)
    base = run_events(trace, trace.config, make_executor(trace.config))
    other = run_events(trace, changed, make_executor(changed))
    return base, other, changed


def override_config(config: EngineConfig, overrides: dict) -> EngineConfig:
    """Apply ``section.field=value`` (or a bare field name found in one section)."""
    sections = {"model": config.model, "cache": config.cache, "scheduler": config.scheduler, "parallel": config.parallel}
    for key, value in overrides.items():
        if "." in key:
            sec, field = key.split(".", 1)
        else:
            found = [s for s, obj in sections.items() if key in field_names(obj)]
            if len(found) != 1:
                raise ValueError(f"unknown config key {key!r}; use section.field (model, cache, scheduler)")
            sec, field = found[0], key
        if sec not in sections or field not in field_names(sections[sec]):
            raise ValueError(f"unknown config key {key!r}")
        current = getattr(sections[sec], field)
        sections[sec] = attrs.evolve(sections[sec], **{field: _coerce(value, current, key)})
    return EngineConfig(**sections)


def field_names(obj) -> set[str]:
    return {f.name for f in attrs.fields(type(obj))}


def _coerce(value, current, key):
    if not isinstance(value, str):
        return value
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    return value


def summarise_change(base: RunSummary, other: RunSummary) -> str:
    lines = [f"steps: {base.steps} -> {other.steps}; preemptions: {base.preemptions} -> {other.preemptions}"]
    for rid in sorted(set(base.finish_step) | set(other.finish_step)):
        b, o = base.finish_step.get(rid), other.finish_step.get(rid)
        same = base.tokens.get(rid) == other.tokens.get(rid)
        lines.append(f"  {rid}: finished at step {b} -> {o}; tokens {'same' if same else 'DIFFER'}")
    return "\n".join(lines)


def compare_traces(a: Trace, b: Trace) -> Divergence | None:
    """The first step where two recordings differ (inputs, plan, state or outputs)."""
    if a.config != b.config:
        return Divergence(-1, "config", (), f"  {a.config}\n  vs\n  {b.config}")
    ea, eb = list(a.events), list(b.events)
    for x, y in zip(ea, eb):
        if x == y:
            continue
        step = x.get("step", -1)
        if x["type"] == y["type"] == "step":
            if x["plan"] != y["plan"]:
                ids, text = diff_plans(x.get("rows", {}), y.get("rows", {"seq_ids": [], "request_ids": []}))
                return Divergence(step, "plan", ids, text)
            if x["sampled"] != y["sampled"]:
                rids = tuple(x.get("rows", {}).get("request_ids", []))
                return Divergence(step, "token", rids, f"  sampled {x['sampled']} vs {y['sampled']}")
            return Divergence(step, "state", (), "  state digests differ")
        return Divergence(step, "input", (), f"  {x}\n  vs\n  {y}")
    if len(ea) != len(eb):
        return Divergence(-1, "trace", (), f"  one trace is longer ({len(ea)} vs {len(eb)} events)")
    return None
