"""``commit`` (pure) and ``step`` (the one impure turn of the loop).

``commit(state, plan, output, config)`` takes the device's sampled tokens for
a plan made by ``schedule`` from this state's predecessor: it registers the
blocks the step filled in the prefix cache, forks requests with ``n > 1`` on
their first sample (children share every block), appends each sampled token,
and finishes sequences on ``max_tokens``, EOS (unless ``ignore_eos``) or a
stop token id, never before ``min_tokens``. A finished sequence's blocks
are freed at once; a request leaves the state when its last sequence ends.
Rows whose sequence is gone (aborted between schedule and commit) are skipped.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from fnllm.blocks import PoolEdit, hash_block
from fnllm.config import EngineConfig
from fnllm.schedule import schedule
from fnllm.state import (
    COLUMNS,
    BatchPlan,
    EngineState,
    InvariantError,
    Request,
    Running,
    SeqOutput,
    StepOutput,
    seq_tokens,
)


class Executor(Protocol):
    def execute(self, plan: BatchPlan) -> StepOutput: ...


def _check_output(plan: BatchPlan, output: StepOutput, vocab: int) -> None:
    if len(output.sampled) != len(plan):
        raise InvariantError(f"device returned {len(output.sampled)} rows for a plan of {len(plan)}")
    for r, (want, got) in enumerate(zip(plan.num_samples, output.sampled)):
        if len(got) != want:
            raise InvariantError(f"plan row {r} asked for {want} samples, device returned {len(got)}")
        for t in got:
            if not 0 <= t < vocab:
                raise InvariantError(f"plan row {r}: sampled token {t} outside the vocabulary [0, {vocab})")


def _stop_reason(req: Request, token: int, num_output: int, eos: tuple[int, ...]) -> tuple[str, object] | None:
    sp = req.sampling
    if num_output >= sp.max_tokens:
        return "length", None
    if num_output < sp.min_tokens:
        return None
    if token in sp.stop_token_ids:
        return "stop", token
    if not sp.ignore_eos and token in eos:
        return "stop", None
    return None


class _Commit:
    """Local working copy of one commit; frozen by ``finish``."""

    def __init__(self, state: EngineState, config: EngineConfig) -> None:
        self.state, self.config = state, config
        self.bs = config.cache.block_size
        self.edit = PoolEdit(state.pool)
        self.cols = {c: list(getattr(state.running, c)) for c in COLUMNS}
        self.live = [True] * len(state.running)
        self.alive = state.alive.mutate()
        self.requests = state.requests.mutate()
        self.outputs: list[SeqOutput] = []

    def register_full_blocks(self, i: int, req: Request, start: int, end: int) -> None:
        """Name the blocks that positions [start, end) completed, extending the hash chain."""
        bs, c = self.bs, self.cols
        first, last = start // bs, end // bs
        if first == last:
            return
        hashes = list(c["hashes"][i])
        table, extra, prompt = c["tables"][i], req.extra_keys, req.prompt_token_ids
        out, nout = c["outputs"][i], c["num_output"][i]
        for j in range(min(first, len(hashes)), last):
            toks = seq_tokens(prompt, out, nout, j * bs, (j + 1) * bs)
            parent = hashes[j - 1] if j else None
            if j == len(hashes):
                hashes.append(hash_block(parent, toks, extra))
            if j >= first:
                self.edit.cache(table[j], hashes[j], (parent, toks, extra))
        c["hashes"][i] = tuple(hashes)

    def fork(self, i: int, n_children: int) -> list[int]:
        """Rows for children 1..n_children of row ``i``, sharing its blocks."""
        c, rows = self.cols, []
        for b in c["tables"][i]:
            for _ in range(n_children):
                self.edit.incref(b)
        first_id = self.state.next_seq_id + len(self.cols["seq_ids"]) - len(self.state.running)
        for k in range(n_children):
            for name in COLUMNS:
                c[name].append(c[name][i])
            c["seq_ids"][-1] = first_id + k
            c["indexes"][-1] = k + 1
            self.live.append(True)
            rows.append(len(self.live) - 1)
        rid = c["request_ids"][i]
        self.alive[rid] = self.alive[rid] + n_children
        return rows

    def append(self, i: int, req: Request, token: int, logprobs) -> None:
        c = self.cols
        c["outputs"][i] = (token, c["outputs"][i])
        nout = c["num_output"][i] + 1
        c["num_output"][i] = nout
        stop = _stop_reason(req, token, nout, self.config.model.eos_token_ids)
        reason, why = stop if stop else (None, None)
        done = False
        if stop:
            self.edit.free_table(c["tables"][i])
            self.live[i] = False
            left = self.alive[req.request_id] - 1
            self.alive[req.request_id] = left
            if left == 0:
                done = True
                del self.alive[req.request_id]
                del self.requests[req.request_id]
        self.outputs.append(
            SeqOutput(
                request_id=req.request_id,
                index=c["indexes"][i],
                seq_id=c["seq_ids"][i],
                new_token_ids=(token,),
                finish_reason=reason,
                stop_reason=why,
                logprobs=None if logprobs is None else (logprobs,),
                request_finished=done,
            )
        )

    def finish(self) -> EngineState:
        c, live = self.cols, self.live
        if all(live):
            running = Running(**{k: tuple(v) for k, v in c.items()})
        else:
            running = Running(**{k: tuple(x for x, ok in zip(v, live) if ok) for k, v in c.items()})
        forked = len(c["seq_ids"]) - len(self.state.running)
        return attrs.evolve(
            self.state,
            pool=self.edit.finish(),
            running=running,
            alive=self.alive.finish(),
            requests=self.requests.finish(),
            next_seq_id=self.state.next_seq_id + forked,
        )


def commit(
    state: EngineState, plan: BatchPlan, output: StepOutput, config: EngineConfig
) -> tuple[EngineState, tuple[SeqOutput, ...]]:
    """Apply the device's output for ``plan``; the new state and each sequence's news."""
    _check_output(plan, output, config.model.vocab_size)
    work = _Commit(state, config)
    row_of = {sid: i for i, sid in enumerate(state.running.seq_ids)}
    requests = state.requests
    for r, sid in enumerate(plan.seq_ids):
        i = row_of.get(sid)
        if i is None:
            continue
        req = requests[plan.request_ids[r]]
        if config.cache.enable_prefix_caching:
            pos = plan.positions[r]
            work.register_full_blocks(i, req, pos, pos + len(plan.token_ids[r]))
        sampled = output.sampled[r]
        if not sampled:
            continue
        rows = [i] + (work.fork(i, len(sampled) - 1) if len(sampled) > 1 else [])
        lps = output.logprobs[r] if output.logprobs is not None else None
        for k, (row, tok) in enumerate(zip(rows, sampled)):
            work.append(row, req, tok, None if lps is None else lps[k])
    return work.finish(), tuple(work.outputs)


def step(
    state: EngineState, executor: Executor, config: EngineConfig, *, now: float = 0.0
) -> tuple[EngineState, BatchPlan, StepOutput, tuple[SeqOutput, ...]]:
    """One turn: schedule, execute (the only impure call), commit."""
    state, plan = schedule(state, config, now=now)
    output = executor.execute(plan) if len(plan) else StepOutput()
    state, outs = commit(state, plan, output, config)
    return state, plan, output, outs
