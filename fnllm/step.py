"""``commit`` (pure) and ``step`` (the one impure turn of the loop).

``commit(state, plan, output, config)`` takes the device's sampled tokens for
a plan made by ``schedule`` (which produced ``state``): it registers the
blocks the step filled in the prefix cache, forks requests with ``n > 1`` on
their first sample (children share every block), appends each sampled token,
and finishes sequences on ``max_tokens``, EOS (unless ``ignore_eos``) or a
stop token id, never before ``min_tokens``. A finished sequence's blocks
are freed at once; a request leaves the state when its last sequence ends.
Rows whose sequence is gone (aborted between schedule and commit) are skipped.
"""

from __future__ import annotations

from itertools import chain

import attrs

from fnllm.blocks import PoolEdit, hash_block
from fnllm.config import EngineConfig
from fnllm.schedule import schedule
from fnllm.state import COLUMNS, BatchPlan, EngineState, Executor, InvariantError, Outputs, Running, StepOutput, seq_tokens


def check_output(plan: BatchPlan, output: StepOutput, vocab: int) -> None:
    """``InvariantError`` unless ``output`` has the shape ``plan`` asks for and in-vocabulary tokens."""
    if len(output.sampled) != len(plan):
        raise InvariantError(f"device returned {len(output.sampled)} rows for a plan of {len(plan)}")
    if tuple(map(len, output.sampled)) != plan.num_samples:
        r = next(r for r, (g, w) in enumerate(zip(output.sampled, plan.num_samples)) if len(g) != w)
        raise InvariantError(f"plan row {r} asked for {plan.num_samples[r]} samples, got {len(output.sampled[r])}")
    plp = output.prompt_logprobs
    if plp is not None and tuple(map(len, plp)) != tuple(map(len, plan.prompt_targets or ((),) * len(plan))):
        raise InvariantError("device returned prompt logprobs that do not match the plan's prompt_targets")
    flat = list(chain.from_iterable(output.sampled))
    if flat and (min(flat) < 0 or max(flat) >= vocab):
        raise InvariantError(f"sampled token outside the vocabulary [0, {vocab}): {min(flat)}..{max(flat)}")


class _Commit:
    """Local working copy of one commit; frozen by ``finish``."""

    def __init__(self, state: EngineState, config: EngineConfig) -> None:
        self.state, self.config = state, config
        self.bs = config.cache.block_size
        self.eos = frozenset(config.model.eos_token_ids)
        self.edit = PoolEdit(state.pool)
        self.cols = {c: list(getattr(state.running, c)) for c in COLUMNS}
        self.live = [True] * len(state.running)
        self.alive = state.alive.mutate()
        self.requests = state.requests.mutate()
        # the step's news, one entry per appended token: row, token, finish and stop reasons, logprobs
        self.rows: list[int] = []
        self.toks: list[int] = []
        self.whys: list[str | None] = []
        self.stops: list[int | None] = []
        self.lps: list | None = None
        self.finished: list[str] = []

    def register_full_blocks(self, i: int, start: int, end: int) -> None:
        """Name the blocks that positions [start, end) completed, extending the hash chain."""
        bs, c = self.bs, self.cols
        first, last = start // bs, end // bs
        req = self.requests[c["request_ids"][i]]
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
        first_id = self.state.next_seq_id + len(c["seq_ids"]) - len(self.state.running)
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

    @staticmethod
    def _reason(sp, token: int, nout: int, eos: frozenset) -> tuple[str | None, int | None]:
        if nout >= sp.max_tokens:
            return "length", None
        if nout >= sp.min_tokens:
            if token in sp.stop_token_ids:
                return "stop", token
            if token in eos and not sp.ignore_eos:
                return "stop", None
        return None, None

    def append(self, pairs: list[tuple[int, int]], logprobs: list | None) -> None:
        """Append token ``t`` to row ``i`` for each ``(i, t)``; end rows that stop."""
        c, eos = self.cols, self.eos
        outs, nouts, nts, sps = c["outputs"], c["num_output"], c["num_tokens"], c["sampling"]
        for i, token in pairs:
            outs[i] = (token, outs[i])
            nout = nouts[i] = nouts[i] + 1
            nts[i] += 1
            why, stop = self._reason(sps[i], token, nout, eos)
            self.rows.append(i)
            self.toks.append(token)
            self.whys.append(why)
            self.stops.append(stop)
            if why is not None:
                self._end(i)
        self.lps = logprobs

    def append_every_row(self, toks: list[int], logprobs: list | None) -> None:
        """``append`` for the common step where row ``i`` gets ``toks[i]``, column-wise."""
        c, eos, n = self.cols, self.eos, len(toks)
        c["outputs"] = [(t, o) for t, o in zip(toks, c["outputs"])]
        nouts = c["num_output"] = [k + 1 for k in c["num_output"]]
        c["num_tokens"] = [k + 1 for k in c["num_tokens"]]
        self.rows, self.toks, self.lps = list(range(n)), toks, logprobs
        self.whys, self.stops = [None] * n, [None] * n
        ending = [
            i
            for i, (t, k, sp) in enumerate(zip(toks, nouts, c["sampling"]))
            if k >= sp.max_tokens or (k >= sp.min_tokens and (t in eos or t in sp.stop_token_ids))
        ]
        for i in ending:
            why, stop = self._reason(c["sampling"][i], toks[i], nouts[i], eos)
            if why is not None:
                self.whys[i], self.stops[i] = why, stop
                self._end(i)

    def _end(self, i: int) -> None:
        rid = self.cols["request_ids"][i]
        self.edit.free_table(self.cols["tables"][i])
        self.live[i] = False
        left = self.alive[rid] - 1
        if left:
            self.alive[rid] = left
        else:
            del self.alive[rid]
            del self.requests[rid]
            self.finished.append(rid)

    def finish(self, with_logprobs: bool) -> tuple[EngineState, Outputs]:
        c, live = self.cols, self.live
        if all(live):
            running = Running(*(tuple(c[k]) for k in COLUMNS))
        else:
            running = Running(*(tuple(x for x, ok in zip(c[k], live) if ok) for k in COLUMNS))
        forked = len(c["seq_ids"]) - len(self.state.running)
        state = attrs.evolve(
            self.state,
            pool=self.edit.finish(),
            running=running,
            alive=self.alive.finish(),
            requests=self.requests.finish(),
            next_seq_id=self.state.next_seq_id + forked,
        )
        rows, run = self.rows, self.state.running
        if len(rows) == len(run) == len(c["seq_ids"]) and rows == list(range(len(rows))):
            rids, idxs, sids = run.request_ids, run.indexes, run.seq_ids
        else:
            rids = tuple([c["request_ids"][i] for i in rows])
            idxs = tuple([c["indexes"][i] for i in rows])
            sids = tuple([c["seq_ids"][i] for i in rows])
        outputs = Outputs(
            rids, idxs, sids, tuple(self.toks), tuple(self.whys), tuple(self.stops),
            tuple(self.lps) if with_logprobs else None, tuple(self.finished),
        )
        return state, outputs


def commit(state: EngineState, plan: BatchPlan, output: StepOutput, config: EngineConfig) -> tuple[EngineState, Outputs]:
    """Apply the device's output for ``plan``; the new state and each sequence's news."""
    check_output(plan, output, config.model.vocab_size)
    work = _Commit(state, config)
    run_ids = state.running.seq_ids
    if plan.seq_ids == run_ids:
        row_of = None  # the common case: every running row was scheduled, in order
    else:
        row_of = {sid: i for i, sid in enumerate(run_ids)}
    caching, bs = config.cache.enable_prefix_caching, config.cache.block_size
    lps_all = output.logprobs
    if row_of is None and caching:
        crossing = [r for r, (p, t) in enumerate(zip(plan.positions, plan.token_ids)) if (p + len(t)) // bs != p // bs]
        for r in crossing:
            work.register_full_blocks(r, plan.positions[r], plan.positions[r] + len(plan.token_ids[r]))
    if row_of is None and plan.num_samples.count(1) == len(plan):
        lps = None if lps_all is None else [x[0] for x in lps_all]
        work.append_every_row([x[0] for x in output.sampled], lps)
        return work.finish(lps_all is not None)
    pairs: list[tuple[int, int]] = []
    lps = None if lps_all is None else []
    for r, sid in enumerate(plan.seq_ids):
        i = r if row_of is None else row_of.get(sid)
        if i is None:
            continue
        pos, n_new = plan.positions[r], len(plan.token_ids[r])
        if caching and row_of is not None and (pos + n_new) // bs != pos // bs:
            work.register_full_blocks(i, pos, pos + n_new)
        sampled = output.sampled[r]
        if len(sampled) == 1:
            pairs.append((i, sampled[0]))
        elif sampled:
            pairs.extend(zip([i] + work.fork(i, len(sampled) - 1), sampled))
        if lps is not None and sampled:
            lps.extend(lps_all[r])
    work.append(pairs, lps)
    return work.finish(lps_all is not None)


def step(
    state: EngineState, executor: Executor, config: EngineConfig, *, now: float = 0.0
) -> tuple[EngineState, BatchPlan, StepOutput, Outputs]:
    """One turn: schedule, execute (the only impure call), commit."""
    state, plan = schedule(state, config, now=now)
    output = executor.execute(plan) if plan.has_device_work else StepOutput()
    state, outs = commit(state, plan, output, config)
    return state, plan, output, outs
