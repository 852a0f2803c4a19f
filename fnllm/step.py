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

from itertools import chain, compress, repeat
from operator import add, attrgetter, ge, itemgetter, mod

import attrs

from fnllm.blocks import PoolEdit, hash_block
from fnllm.config import EngineConfig
from fnllm.derived import filled, known_crossing, length_margin, note_decode_ready, note_length_margin, traits
from fnllm.replace import replacer
from fnllm.schedule import chunk_crossing, decode_crossing, schedule
from fnllm.spec import expected_samples, num_accepted
from fnllm.state import (
    COLUMNS, HOLE, BatchPlan, EngineState, Executor, InvariantError, Outputs, Running, StepOutput, running_from,
    seq_tokens,
)


_max_tokens = attrgetter("max_tokens")
_stop_ids = attrgetter("stop_token_ids")
_head = itemgetter(0)
_replace_state = replacer(EngineState)
_replace_running = replacer(Running)


def check_output(plan: BatchPlan, output: StepOutput, vocab: int) -> None:
    """``InvariantError`` unless ``output`` has the shape ``plan`` asks for and in-vocabulary tokens."""
    if len(output.sampled) != len(plan):
        raise InvariantError(f"device returned {len(output.sampled)} rows for a plan of {len(plan)}")
    want = expected_samples(plan)
    flat = _one_each(output.sampled) if want.count(1) == len(want) else None
    if flat is None:
        if tuple(map(len, output.sampled)) != want:
            r = next(r for r, (g, w) in enumerate(zip(output.sampled, want)) if len(g) != w)
            raise InvariantError(f"plan row {r} asked for {want[r]} samples, got {len(output.sampled[r])}")
        flat = list(chain.from_iterable(output.sampled))
    plp = output.prompt_logprobs
    if plp is not None and tuple(map(len, plp)) != tuple(map(len, plan.prompt_targets or ((),) * len(plan))):
        raise InvariantError("device returned prompt logprobs that do not match the plan's prompt_targets")
    if flat and (min(flat) < 0 or max(flat) >= vocab):
        raise InvariantError(f"sampled token outside the vocabulary [0, {vocab}): {min(flat)}..{max(flat)}")


def _one_each(sampled: tuple) -> list[int] | None:
    """The tokens of rows that each hold exactly one, in one pass; None when some row does not."""
    try:
        return [t for (t,) in sampled]
    except (TypeError, ValueError):
        return None


def register_blocks(edit: PoolEdit, req, table, hashes: tuple, output, num_output: int, start: int, end: int, bs: int) -> tuple:
    """Name in the prefix cache the blocks of ``table`` that positions
    [start, end) completed; the sequence's hash chain, extended."""
    first, last = start // bs, end // bs
    known = len(hashes)
    extra = req.extra_keys
    if last - first == 1 and known == first:  # one block, next in the chain (a decode step's): no slicing
        parent = hashes[-1] if known else None
        span = seq_tokens(req.prompt_token_ids, output, num_output, first * bs, last * bs)
        h = hash_block(parent, span, extra)
        edit.cache(table[first], h, (parent, span, extra))
        return hashes + (h,)
    lo = min(first, known)
    if lo >= last:
        return hashes
    span = seq_tokens(req.prompt_token_ids, output, num_output, lo * bs, last * bs)
    parent = hashes[lo - 1] if lo else None
    new = []
    for j in range(lo, last):
        toks = span[(j - lo) * bs : (j - lo + 1) * bs]
        if j < known:
            h = hashes[j]
        else:
            h = hash_block(parent, toks, extra)
            new.append(h)
        if j >= first:
            edit.cache(table[j], h, (parent, toks, extra))
        parent = h
    return hashes + tuple(new) if new else hashes


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
        self.spec: list[tuple[str, int, int, int]] = []  # drafted rows: (request, index, drafts, accepted)

    def register_full_blocks(self, i: int, start: int, end: int) -> None:
        """Name the blocks that positions [start, end) completed, extending the hash chain."""
        c = self.cols
        req = self.requests[c["request_ids"][i]]
        c["hashes"][i] = register_blocks(
            self.edit, req, c["tables"][i], c["hashes"][i], c["outputs"][i], c["num_output"][i], start, end, self.bs
        )

    def fork(self, i: int, n_children: int) -> list[int]:
        """Rows for children 1..n_children of row ``i``, sharing its blocks."""
        c, rows = self.cols, []
        for b in c["tables"][i]:
            if b == HOLE:  # a child shares its parent's holes too
                continue
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
        """``append`` for the common step where row ``i`` gets ``toks[i]``, column-wise
        (C-level passes only; the rows that may end are then checked one by one)."""
        c, eos, n = self.cols, self.eos, len(toks)
        sps = c["sampling"]
        c["outputs"] = list(zip(toks, c["outputs"]))
        nouts = c["num_output"] = list(map(add, c["num_output"], repeat(1)))
        c["num_tokens"] = list(map(add, c["num_tokens"], repeat(1)))
        self.rows, self.toks, self.lps = range(n), toks, logprobs
        self.whys, self.stops = [None] * n, [None] * n
        ending = set(compress(range(n), map(ge, nouts, map(_max_tokens, sps))))
        stops = eos.union(*map(_stop_ids, sps))
        if not stops.isdisjoint(toks):
            ending.update(compress(range(n), map(stops.__contains__, toks)))
        for i in sorted(ending):
            why, stop = self._reason(sps[i], toks[i], nouts[i], eos)
            if why is not None:
                self.whys[i], self.stops[i] = why, stop
                self._end(i)

    def append_drafted(self, i: int, pos: int, drafts: tuple, sampled: tuple, lps, lps_out: list) -> None:
        """Row ``i`` ran ``(last token, *drafts)`` from ``pos`` and sampled
        ``sampled`` (one per position): commit the accepted drafts and the
        token after them, in order, up to the first that ends the sequence;
        register the blocks now full of committed KV; give back the blocks
        only rejected drafts used (or the whole table when it ended)."""
        c, bs = self.cols, self.bs
        a = num_accepted(drafts, sampled)
        self.spec.append((c["request_ids"][i], c["indexes"][i], len(drafts), a))
        m, why, sp = 0, None, c["sampling"][i]
        for token in sampled[: a + 1]:
            c["outputs"][i] = (token, c["outputs"][i])
            nout = c["num_output"][i] = c["num_output"][i] + 1
            c["num_tokens"][i] += 1
            why, stop = self._reason(sp, token, nout, self.eos)
            self.rows.append(i)
            self.toks.append(token)
            self.whys.append(why)
            self.stops.append(stop)
            if lps is not None:
                lps_out.append(lps[m] if m < len(lps) else None)
            m += 1
            if why is not None:
                break
        kv_end = pos + 1 + min(a, m)  # committed tokens whose KV this step wrote
        if self.config.cache.enable_prefix_caching and kv_end // bs != pos // bs:
            self.register_full_blocks(i, pos, kv_end)
        if why is not None:
            self._end(i)
            return
        table = c["tables"][i]
        keep = -(-kv_end // bs)
        for b in reversed(table[keep:]):
            self.edit.decref(b)
        c["tables"][i] = table[:keep]
        c["num_computed"][i] = kv_end

    def _end(self, i: int) -> None:
        self.live[i] = False
        _end_sequence(self.edit, self.alive, self.requests, self.finished, self.cols["request_ids"][i], self.cols["tables"][i])

    def finish(self, with_logprobs: bool) -> tuple[EngineState, Outputs]:
        c, live = self.cols, self.live
        running = running_from(c, live, self.state.running)
        forked = len(c["seq_ids"]) - len(self.state.running)
        state = _replace_state(
            self.state,
            pool=self.edit.finish(),
            running=running,
            alive=self.alive.finish(),
            requests=self.requests.finish(),
            next_seq_id=self.state.next_seq_id + forked,
        )
        rows, run = self.rows, self.state.running
        in_order = isinstance(rows, range) or rows == list(range(len(rows)))
        if len(rows) == len(run) == len(c["seq_ids"]) and in_order:
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


def _commit_decode(
    state: EngineState, plan: BatchPlan, output: StepOutput, config: EngineConfig
) -> tuple[EngineState, Outputs] | None:
    """``commit`` for the common step, column-wise: every running row was
    scheduled in order (decode rows, last prefill chunks) and sampled one
    token, none stops on a token, and rows end only on ``max_tokens``
    (:func:`_end_by_length`); None otherwise: the general path decides.
    Agrees with the general path exactly."""
    run = state.running
    margin = length_margin(run.sampling, run.num_output)
    toks = tuple(map(_head, output.sampled))
    tr = traits(run.sampling)
    if not tr.stop_ids.union(config.model.eos_token_ids).isdisjoint(toks):
        return None  # a stop or EOS token (even if min_tokens or ignore_eos keeps it going): rare, general path
    pool, hashes = state.pool, run.hashes
    edit = None
    if config.cache.enable_prefix_caching:
        crossing = _crossing(plan, config.cache.block_size)
        if crossing:
            edit = PoolEdit(pool)
            hashes = _register_rows(edit, state, plan, crossing, config.cache.block_size)
    nouts = tuple(map(add, run.num_output, repeat(1)))
    outputs, ntoks = tuple(zip(toks, run.outputs)), tuple(map(add, run.num_tokens, repeat(1)))
    n, lps = len(run), output.logprobs
    lps = None if lps is None else tuple([x[0] if x else None for x in lps])  # () : no logprobs asked
    if margin <= 1:
        return _end_by_length(state, edit or PoolEdit(pool), toks, lps, outputs=outputs, num_output=nouts,
                              num_tokens=ntoks, hashes=hashes)
    running = _replace_running(run, outputs=outputs, num_output=nouts, num_tokens=ntoks, hashes=hashes)
    note_length_margin(run.sampling, nouts, margin - 1)
    note_decode_ready(running)  # every row was computed to its end and now has one new token
    news = Outputs(run.request_ids, run.indexes, run.seq_ids, toks, filled(None, n), filled(None, n), lps, ())
    return _replace_state(state, pool=pool if edit is None else edit.finish(), running=running), news


def _end_by_length(state: EngineState, edit: PoolEdit, toks: tuple, lps, **changed) -> tuple[EngineState, Outputs]:
    """The end of :func:`_commit_decode` when rows reach ``max_tokens``
    (``changed``: the columns with the step's token appended): those rows
    end with reason "length" (before any stop check, as in the general
    path), in row order; their blocks are freed, last block first."""
    run = state.running
    ending = list(compress(range(len(run)), map(ge, changed["num_output"], traits(run.sampling).max_tokens)))
    alive, requests, finished = state.alive.mutate(), state.requests.mutate(), []
    whys, live = [None] * len(run), [True] * len(run)
    for i in ending:
        whys[i], live[i] = "length", False
        _end_sequence(edit, alive, requests, finished, run.request_ids[i], run.tables[i])
    running = running_from({k: changed[k] if k in changed else getattr(run, k) for k in COLUMNS}, live, run)
    note_decode_ready(running)  # the rows left were computed to their end and have one new token
    news = Outputs(run.request_ids, run.indexes, run.seq_ids, toks, tuple(whys), filled(None, len(run)), lps, tuple(finished))
    state = _replace_state(state, pool=edit.finish(), running=running, alive=alive.finish(), requests=requests.finish())
    return state, news


def _end_sequence(edit: PoolEdit, alive, requests, finished: list[str], rid: str, table: tuple[int, ...]) -> None:
    """A sequence ended: its blocks are freed (last first); its request leaves
    ``alive`` and ``requests`` (mutations), and joins ``finished``, when it was
    the request's last sequence."""
    edit.free_table(table)
    left = alive[rid] - 1
    if left:
        alive[rid] = left
    else:
        del alive[rid], requests[rid]
        finished.append(rid)


def _register_rows(edit: PoolEdit, state: EngineState, plan: BatchPlan, rows: list[int], bs: int) -> tuple:
    """:func:`register_blocks` for plan rows ``rows`` (= running rows): the hashes column, extended."""
    run, requests = state.running, state.requests
    hashes = list(run.hashes)
    for r in rows:
        p = plan.positions[r]
        hashes[r] = register_blocks(edit, requests[run.request_ids[r]], run.tables[r], hashes[r], run.outputs[r],
                                    run.num_output[r], p, p + len(plan.token_ids[r]), bs)
    return tuple(hashes)


def _crossing(plan: BatchPlan, bs: int) -> list[int]:
    """Rows whose new tokens complete at least one block."""
    known = known_crossing(plan, bs)
    if known is not None:
        return known
    lens = list(map(len, plan.token_ids))
    if lens.count(1) == len(lens):  # all decode rows: those whose position ends a block
        return decode_crossing(list(map(mod, plan.positions, repeat(bs))), bs)
    return chunk_crossing(plan.positions, plan.token_ids, bs)


def commit(
    state: EngineState, plan: BatchPlan, output: StepOutput, config: EngineConfig, *, checked: bool = False
) -> tuple[EngineState, Outputs]:
    """Apply the device's output for ``plan``; the new state and each sequence's news.
    ``checked``: the caller already ran :func:`check_output` on ``output``."""
    if not checked:
        check_output(plan, output, config.model.vocab_size)
    if any(plan.num_draft_tokens):
        return _commit_drafted(state, plan, output, config)
    run_ids = state.running.seq_ids
    if plan.seq_ids == run_ids and plan.num_samples.count(1) == len(plan) and len(plan):
        quiet = _commit_decode(state, plan, output, config)
        if quiet is not None:
            return quiet
    work = _Commit(state, config)
    if plan.seq_ids == run_ids:
        row_of = None  # the common case: every running row was scheduled, in order
    else:
        row_of = {sid: i for i, sid in enumerate(run_ids)}
    caching, bs = config.cache.enable_prefix_caching, config.cache.block_size
    lps_all = output.logprobs
    if row_of is None and caching:
        for r in _crossing(plan, bs):
            work.register_full_blocks(r, plan.positions[r], plan.positions[r] + len(plan.token_ids[r]))
    if row_of is None and plan.num_samples.count(1) == len(plan):
        lps = None if lps_all is None else [x[0] if x else None for x in lps_all]  # () : no logprobs asked
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
            row_lps = lps_all[r]
            lps.extend(row_lps[j] if j < len(row_lps) else None for j in range(len(sampled)))
    work.append(pairs, lps)
    return work.finish(lps_all is not None)


def _commit_drafted(state: EngineState, plan: BatchPlan, output: StepOutput, config: EngineConfig) -> tuple[EngineState, Outputs]:
    """``commit`` for a plan whose rows carry drafts (speculative decoding,
    :mod:`fnllm.spec`): a drafted row commits its accepted drafts and the
    token sampled after them (:meth:`_Commit.append_drafted`); the other rows
    as ``commit`` does."""
    work = _Commit(state, config)
    row_of = {sid: i for i, sid in enumerate(state.running.seq_ids)}
    caching, bs = config.cache.enable_prefix_caching, config.cache.block_size
    lps_all = output.logprobs
    pairs: list[tuple[int, int]] = []
    lps_pairs: list = []
    lps_spec: list = []
    for r, sid in enumerate(plan.seq_ids):
        i = row_of.get(sid)
        if i is None:
            continue
        pos, toks, d, sampled = plan.positions[r], plan.token_ids[r], plan.num_draft_tokens[r], output.sampled[r]
        row_lps = None if lps_all is None else lps_all[r]
        if d:
            work.append_drafted(i, pos, toks[len(toks) - d :], sampled, row_lps, lps_spec)
            continue
        if caching and (pos + len(toks)) // bs != pos // bs:
            work.register_full_blocks(i, pos, pos + len(toks))
        if len(sampled) == 1:
            pairs.append((i, sampled[0]))
        elif sampled:
            pairs.extend(zip([i] + work.fork(i, len(sampled) - 1), sampled))
        if row_lps is not None:
            lps_pairs.extend(row_lps[j] if j < len(row_lps) else None for j in range(len(sampled)))
    work.append(pairs, None)
    work.lps = lps_spec + lps_pairs
    state, outs = work.finish(lps_all is not None)
    drafted = [(d, a) for (_, _, d, a) in work.spec]
    state = attrs.evolve(
        state,
        spec_num_drafts=state.spec_num_drafts + len(drafted),
        spec_num_draft_tokens=state.spec_num_draft_tokens + sum(d for d, _ in drafted),
        spec_num_accepted_tokens=state.spec_num_accepted_tokens + sum(a for _, a in drafted),
    )
    return state, attrs.evolve(outs, spec=tuple(work.spec))


def step(
    state: EngineState, executor: Executor, config: EngineConfig, *, now: float = 0.0
) -> tuple[EngineState, BatchPlan, StepOutput, Outputs]:
    """One turn: schedule, execute (the only impure call), commit."""
    state, plan = schedule(state, config, now=now)
    output = executor.execute(plan) if plan.has_device_work else StepOutput()
    state, outs = commit(state, plan, output, config)
    return state, plan, output, outs
