"""``schedule(state, config, now=...) -> (state, plan)``: one step's decisions.

vLLM v1's scheduling model as a pure function. Every sequence has one
counter, ``num_computed``, catching up with its token count. Running
sequences are served first, in admission order, each taking as many tokens
as the budget (``max_num_batched_tokens``) and the long-prefill cap allow;
then, if nothing was preempted, waiting sequences are admitted in policy
order (FCFS, or priority then arrival), strictly: the first that does not
fit stops admission. A new sequence starts with its longest cached prefix
counted as computed (device tier first, then the host tier, whose blocks
are swapped in); a request with ``prompt_logprobs`` reads no cached prefix
(every prompt position must be computed for its logprobs), as in vLLM, but
its blocks are cached for later requests. When blocks run out, the lowest-priority, latest running
sequence is preempted and returns to the waiting queue in its original
order: by recompute (blocks freed, counter reset, output kept), or under
``preemption_mode="swap"`` by moving its KV to host blocks (``swap_out``;
recompute when the host tier is full), swapped back in (``swap_in``) on
readmission. A step that preempts admits nothing, so no sequence is swapped
out and back in by one plan. With prefix caching and a host tier, a cached
block evicted by an allocation is offloaded to the host tier (``swap_out``),
and the device runs every swap_out before any swap_in.

Sliding window: before anything is planned, every running row releases the
blocks wholly outside the window of its next position (holes, see
:mod:`fnllm.blocks`), so their room serves this very step; an admitted
sequence takes only the cached blocks inside its window.

The returned state already counts the planned tokens as computed and holds
their blocks; ``commit`` adds the sampled tokens. Every block a plan row
writes into has reference count 1 (shared partial blocks are copied first,
the copy listed in ``plan.copies``). A plan with no rows says why in
``idle_reason``.

Hot path: a decode row (one token to compute, whose tail block is private)
is planned inline without allocation unless it crosses a block boundary.
When every running row decodes, they are planned column-wise: by
``_all_decode`` when nothing waits, else by ``_Step._decode_every_row``
before admission (a server's usual step); both agree with the row loop.
"""

from __future__ import annotations

from itertools import chain, compress, repeat
from operator import add, attrgetter, itemgetter, mod, not_, sub
from typing import Sequence

from fnllm.blocks import PoolEdit, first_window_block
from fnllm.config import EngineConfig
from fnllm.derived import decode_ready, filled, note_crossing, one_token, traits
from fnllm.lifecycle import blocks_for, insert_waiting
from fnllm.replace import replacer
from fnllm.spec import plan_drafts
from fnllm.state import (
    COLUMNS, HOLE, BatchPlan, EngineState, OutputIds, Request, Running, SamplingParams, Seq, SeqStatus,
    guided_outputs, running_from, seq_tokens,
)


_head = itemgetter(0)
_PROMPT_LOGPROBS = attrgetter("prompt_logprobs")
_replace_state = replacer(EngineState)
_replace_running = replacer(Running)


def _width(sp: SamplingParams, num_output: int) -> int:
    """Sequences a row will occupy: ``n`` for a request that has yet to fork."""
    return sp.n if num_output == 0 else 1


class _Step:
    """Local, mutable working copy of one scheduling step; frozen by ``finish``.

    ``rows[i]`` is the plan row of running row ``i``: (tokens, position,
    num_samples, copies), kept in increasing ``i``.
    """

    def __init__(self, state: EngineState, config: EngineConfig) -> None:
        self.state, self.config = state, config
        self.bs = config.cache.block_size
        sc = config.scheduler
        self.budget = sc.max_num_batched_tokens
        self.cap = sc.long_prefill_token_threshold or sc.max_num_batched_tokens
        self.chunking = sc.enable_chunked_prefill
        self.policy = sc.policy
        self.requests = state.requests
        self.edit = PoolEdit(state.pool, offload=host_cache_on(config))
        self.swap = sc.preemption_mode == "swap"
        self.window = config.cache.sliding_window
        self.queries = self.hits = 0
        run = state.running
        self.cols = {c: list(getattr(run, c)) for c in COLUMNS}
        self.live = [True] * len(run)
        self.rows: dict[int, tuple] = {}
        # (token_ids, positions, rows completing a block) of rows 0..n-1 when every
        # running row decodes, planned column-wise (not in rows)
        self.decoded: tuple[tuple, tuple, list[int]] | None = None
        self.preempted: list[Seq] = []
        self.idle_reason = ""
        self.drafts: dict[int, int] = {}  # row -> draft tokens (speculative decoding)

    # -- preemption -----------------------------------------------------------------
    def _victim(self) -> int:
        """Row to preempt: the latest running (FCFS) or lowest priority, then latest."""
        live = [i for i, ok in enumerate(self.live) if ok]
        if self.policy != "priority":
            return live[-1]
        rids, idx = self.cols["request_ids"], self.cols["indexes"]

        def key(i: int) -> tuple:
            r = self.requests[rids[i]]
            return (r.priority, r.arrival, idx[i], i)

        return max(live, key=key)

    def _preempt(self, i: int) -> None:
        c = self.cols
        row = self.rows.pop(i, None)
        nc, table = c["num_computed"][i], c["tables"][i]
        if row is not None:  # planned earlier this step: give its tokens back
            self.budget += len(row[0])
            nc = row[1]
        host_table = self._swap_out(table, nc, row) if self.swap else None
        self.edit.free_table(table)
        self.live[i] = False
        self.preempted.append(
            Seq(
                seq_id=c["seq_ids"][i],
                request_id=c["request_ids"][i],
                index=c["indexes"][i],
                status=SeqStatus.PREEMPTED if host_table is None else SeqStatus.SWAPPED,
                output=c["outputs"][i],
                num_output=c["num_output"][i],
                hashes=c["hashes"][i],
                num_computed=0 if host_table is None else nc,
                swapped=() if host_table is None else tuple(host_table),
            )
        )

    def _swap_out(self, table: tuple[int, ...], nc: int, row: tuple | None) -> list[int] | None:
        """Host blocks now holding the KV of the first ``nc`` tokens, or None
        (host tier full). A row planned this step may have replaced a shared
        block by an unwritten copy: its content is read from the source."""
        blocks = list(table[: blocks_for(nc, self.bs)])
        if row is not None:
            for src, dst in row[3]:
                blocks = [src if b == dst else b for b in blocks]
        return self.edit.swap_out(blocks)

    # -- running sequences -----------------------------------------------------------
    def schedule_running(self) -> None:
        c, edit, bs, rows = self.cols, self.edit, self.bs, self.rows
        ncs, nts, nouts, tables, outs = c["num_computed"], c["num_tokens"], c["num_output"], c["tables"], c["outputs"]
        ref = edit.ref
        if self.window:
            punch_all(edit, ncs, tables, self.window)
        elif self.config.speculative is None and self._decode_every_row():
            return
        for i in range(len(self.live)):
            if self.budget <= 0:
                break
            if not self.live[i]:
                continue
            nc = ncs[i]
            if nts[i] - nc == 1 and nouts[i]:  # decode
                table = tables[i]
                if nc % bs == 0:
                    if edit.num_free:
                        tables[i] = table + (edit.take(),)
                        ncs[i] = nc + 1
                        self.budget -= 1
                        rows[i] = ((outs[i][0],), nc, 1, ())
                        continue
                elif ref[table[-1]] == 1:
                    ncs[i] = nc + 1
                    self.budget -= 1
                    rows[i] = ((outs[i][0],), nc, 1, ())
                    continue
            self._schedule_row(i)

    def _decode_every_row(self) -> bool:
        """Plan every running row's decode token column-wise (``decoded``), when
        the loop of :meth:`schedule_running` would plan just that (every row
        decodes, the budget and the free blocks cover them all, no drafts
        follow); False, and nothing done, otherwise."""
        run, edit, bs = self.state.running, self.edit, self.bs
        n = len(run)
        if not n or self.budget < n or not _every_row_decodes(run, edit.pool, bs):
            return False
        ncs = run.num_computed
        rem, boundary = _decode_blocks(ncs, bs)
        if len(boundary) > edit.num_free:
            return False
        _grow_tables(edit, self.cols["tables"], boundary)
        self.cols["num_computed"] = list(map(add, ncs, repeat(1)))
        self.budget -= n
        self.decoded = (_decode_tokens(run.outputs), ncs, decode_crossing(rem, bs))
        return True

    def _schedule_row(self, i: int) -> None:
        """The general case: a prompt chunk, or a row that needs room or a copy."""
        c = self.cols
        nc = c["num_computed"][i]
        new = min(c["num_tokens"][i] - nc, self.cap, self.budget)
        while self.live[i] and self.edit.num_free < self._blocks_needed(c["tables"][i], nc, new):
            self._preempt(self._victim())
        if not self.live[i]:
            return
        table, copies = list(c["tables"][i]), []
        bs = self.bs
        if nc % bs and self.edit.ref[table[nc // bs]] > 1:
            self.edit.writable(table, nc // bs, copies)
        table.extend(self.edit.allocate(-(-(nc + new) // bs) - len(table)))
        c["tables"][i] = tuple(table)
        self._plan(i, nc, new, copies)

    def _blocks_needed(self, table: tuple[int, ...], nc: int, new: int) -> int:
        bs = self.bs
        cow = 1 if nc % bs and self.edit.ref[table[nc // bs]] > 1 else 0
        return cow + max(0, -(-(nc + new) // bs) - len(table))

    def _plan(self, i: int, nc: int, new: int, copies: list) -> None:
        c = self.cols
        req: Request = self.requests[c["request_ids"][i]]
        nout = c["num_output"][i]
        tokens = seq_tokens(req.prompt_token_ids, c["outputs"][i], nout, nc, nc + new)
        samples = _width(req.sampling, nout) if nc + new == c["num_tokens"][i] else 0
        c["num_computed"][i] = nc + new
        self.budget -= new
        self.rows[i] = (tokens, nc, samples, tuple(copies))

    # -- waiting sequences ------------------------------------------------------------
    def admit_waiting(self) -> int:
        """Admit waiting sequences in order; the number admitted."""
        sc = self.config.scheduler
        waiting = self.state.waiting
        c = self.cols
        # live rows, plus the further sequences of rows that have yet to fork (none when no row has n > 1)
        n_running = self.live.count(True)
        if traits(self.state.running.sampling).max_n > 1:
            n_running += sum(_width(sp, n) - 1 for sp, n, ok in zip(c["sampling"], c["num_output"], self.live) if ok)
        k = 0
        while k < len(waiting) and self.budget > 0:
            seq = waiting[k]
            req = self.requests[seq.request_id]
            width = _width(req.sampling, seq.num_output)
            if n_running + width > sc.max_num_seqs:
                self.idle_reason = self.idle_reason or f"max_num_seqs={sc.max_num_seqs} reached"
                break
            if not self._admit(seq, req):
                break
            n_running += width
            k += 1
        return k

    def _new_tokens(self, req: Request, total: int, nc: int) -> int | None:
        """Tokens an admitted sequence computes this step, or None (no budget)."""
        new = min(total - nc, self.cap)
        if self.chunking:
            return min(new, self.budget)
        if new > self.budget:
            self.idle_reason = f"request {req.request_id!r} needs {new} tokens, budget left {self.budget}"
            return None
        return new

    def _no_room(self, req: Request, need: int, free: int) -> bool:
        self.idle_reason = f"request {req.request_id!r} needs {need} free KV blocks, {free} are free"
        return False

    def _admit(self, seq: Seq, req: Request) -> bool:
        bs, edit = self.bs, self.edit
        total = len(req.prompt_token_ids) + seq.num_output
        if seq.swapped:
            return self._admit_swapped(seq, req, total)
        hits: list[int] = []
        host_hits: list[int] = []
        # prompt_logprobs need every prompt position computed: such a request reads no cached prefix
        if self.config.cache.enable_prefix_caching and req.sampling.prompt_logprobs is None:
            wanted = seq.hashes[: (total - 1) // bs]
            hits = edit.lookup(wanted)
            if edit.offload and len(hits) < len(wanted):
                host_hits = edit.lookup_host(wanted[len(hits) :])
        nc = (len(hits) + len(host_hits)) * bs
        new = self._new_tokens(req, total, nc)
        if new is None:
            return False
        # hits before the window of position nc are counted, never read: holes
        holes = first_window_block(nc, self.window, bs)
        skip_host = max(0, holes - len(hits))
        hits, host_hits = hits[holes:], host_hits[skip_host:]
        need = blocks_for(nc + new, bs) - holes - len(hits)
        evictable = sum(1 for b in hits if edit.ref.get(b, 0) == 0)
        if edit.num_free - evictable < need:
            return self._no_room(req, need, edit.num_free - evictable)
        if self.config.cache.enable_prefix_caching and req.sampling.prompt_logprobs is None:
            self.queries += total
            self.hits += nc
        for b in hits:
            edit.incref(b)
        for h in host_hits:  # pinned before allocating: an offload must not evict them
            edit.host.incref(h)
        fresh = edit.allocate(need)
        if host_hits:
            edit.move_host_hits(host_hits, fresh, seq.hashes[holes + len(hits) :])
        self._add_row(seq, req, nc, total, new, (HOLE,) * holes + tuple(hits + fresh))
        return True

    def _admit_swapped(self, seq: Seq, req: Request, total: int) -> bool:
        """Readmit a swapped sequence: all its host blocks come back at once
        (its holes stay holes)."""
        nc = seq.num_computed
        new = self._new_tokens(req, total, nc)
        if new is None:
            return False
        holes = seq.swapped.count(HOLE)
        need = blocks_for(nc + new, self.bs) - holes
        if self.edit.num_free < need:
            return self._no_room(req, need, self.edit.num_free)
        table = [HOLE] * holes + self.edit.allocate(need)
        self.edit.swap_in(seq.swapped, table)
        self._add_row(seq, req, nc, total, new, tuple(table))
        return True

    def _add_row(self, seq: Seq, req: Request, nc: int, total: int, new: int, table: tuple[int, ...]) -> None:
        row = (seq.seq_id, seq.request_id, seq.index, req.sampling, nc, total, seq.num_output, seq.output, table, seq.hashes)
        for name, v in zip(COLUMNS, row):
            self.cols[name].append(v)
        self.live.append(True)
        self._plan(len(self.live) - 1, nc, new, [])

    # -- result -------------------------------------------------------------------------
    def finish(self, n_admitted: int) -> tuple[EngineState, BatchPlan]:
        state, c, live = self.state, self.cols, self.live
        running = running_from(c, live, state.running)
        waiting = insert_waiting(self.requests, state.waiting[n_admitted:], self.preempted, self.policy)
        plan = self._build_plan(running)
        if self.decoded is not None:
            self._note_crossing(plan)
        new_state = _replace_state(
            state, pool=self.edit.finish(), running=running, waiting=waiting, step=state.step + 1,
            num_preemptions=state.num_preemptions + len(self.preempted),
            prefix_cache_queries=state.prefix_cache_queries + self.queries,
            prefix_cache_hits=state.prefix_cache_hits + self.hits,
        )
        return new_state, plan

    def _note_crossing(self, plan: BatchPlan) -> None:
        """Note for commit the plan rows that complete a block: the column-wise
        decode rows' (known), then the admitted rows'."""
        admitted = chunk_crossing(plan.positions, plan.token_ids, self.bs, len(self.decoded[0]))
        note_crossing(plan, self.bs, self.decoded[2] + admitted)

    def _build_plan(self, running: Running) -> BatchPlan:
        """The plan of the rows planned this step, in row order. When every
        row left running was planned (the usual step), the plan's row
        columns are ``running``'s tuples themselves."""
        c, rows = self.cols, self.rows
        order = list(rows)
        plan_rows = list(rows.values())
        token_ids, positions, num_samples, copies = zip(*plan_rows) if plan_rows else ((), (), (), ())
        planned = len(order)
        if self.decoded is not None:  # rows 0..n-1 (every running row), then the admitted rows
            n = len(self.decoded[0])
            token_ids, positions = self.decoded[0] + token_ids, self.decoded[1] + positions
            num_samples, planned = filled(1, n) + num_samples, planned + n
        reason = ""
        if not planned:
            reason = self.idle_reason or ("no requests" if not self.state.requests else "nothing schedulable")
        tr = None  # the sampling column's traits, when it is running's (memoized): skip what no row needs
        if planned == len(running):  # planned rows are live rows in increasing order: all of them
            seq_ids, request_ids, tables, indexes = running.seq_ids, running.request_ids, running.tables, running.indexes
            sampling, outputs, num_output = running.sampling, running.outputs, running.num_output
            tr = traits(sampling)
        else:
            seq_ids, request_ids, tables, indexes, sampling, outputs, num_output = (
                tuple(map(c[k].__getitem__, order))
                for k in ("seq_ids", "request_ids", "tables", "indexes", "sampling", "outputs", "num_output")
            )
        return BatchPlan(
            step=self.state.step,
            seq_ids=seq_ids,
            request_ids=request_ids,
            token_ids=token_ids,
            positions=positions,
            block_tables=tables,
            num_samples=num_samples,
            sample_index=indexes,
            output_pos=num_output,
            sampling=sampling,
            copies=tuple(chain.from_iterable(copies)),
            swap_out=tuple(self.edit.swaps_out),
            swap_in=tuple(self.edit.swaps_in),
            idle_reason=reason,
            num_draft_tokens=tuple([self.drafts.get(i, 0) for i in order]) if self.drafts else (),
            guided_outputs=guided_outputs(sampling, outputs, num_output) if tr is None or tr.guided else (),
            history=_history(self.requests, sampling, num_samples, outputs, num_output, request_ids)
            if tr is None or tr.history else (),
            prompt_targets=self._prompt_targets(sampling, num_output, request_ids, token_ids, positions),
        )

    def _prompt_targets(self, sampling: tuple, num_output: tuple, request_ids: tuple, token_ids: tuple,
                        positions: tuple) -> tuple:
        """Per row, the prompt tokens whose logprobs its chunk predicts (requests
        with ``prompt_logprobs``, before their first output); () when none."""
        wanted = list(map(_PROMPT_LOGPROBS, sampling))
        if wanted.count(None) == len(wanted) or not any(w is not None and not k for w, k in zip(wanted, num_output)):
            return ()
        out = []
        for want, nout, rid, toks, pos in zip(wanted, num_output, request_ids, token_ids, positions):
            prompt = self.requests[rid].prompt_token_ids
            if want is None or nout or pos + 1 >= len(prompt):
                out.append(())
            else:
                out.append(prompt[pos + 1 : min(pos + len(toks) + 1, len(prompt))])
        return tuple(out)


_NEEDS_HISTORY = attrgetter("needs_history")


def _history(requests, sampling, num_samples, outputs, num_output, request_ids) -> tuple:
    """The plan's ``history`` column: ``(prompt, output)`` for each sampling
    row whose params read the sequence's tokens, ``()`` for the others;
    ``()`` altogether when no row needs it."""
    if not any(map(_NEEDS_HISTORY, sampling)):
        return ()
    out = []
    for sp, n, cell, nout, rid in zip(sampling, num_samples, outputs, num_output, request_ids):
        if not (n and sp.needs_history):
            out.append(())
            continue
        prompt = requests[rid].prompt_token_ids if sp.repetition_penalty != 1 else ()
        out.append((prompt, OutputIds(cell, nout)))
    return tuple(out)


def schedule(state: EngineState, config: EngineConfig, *, now: float = 0.0) -> tuple[EngineState, BatchPlan]:
    """Plan the next step. ``now`` is accepted for the engine's clock but no
    decision depends on it (scheduling is a function of the state alone)."""
    if config.speculative is not None:  # drafts are planned by the general path only
        return schedule_general(state, config)
    fast = _all_decode(state, config)
    return fast if fast is not None else schedule_general(state, config)


def schedule_general(state: EngineState, config: EngineConfig) -> tuple[EngineState, BatchPlan]:
    """The whole algorithm, row by row (``schedule``'s fast path must agree with it)."""
    step = _Step(state, config)
    step.schedule_running()
    admitted = 0 if step.preempted else step.admit_waiting()
    if config.speculative is not None:
        step.drafts = plan_drafts(step, config.speculative)
    return step.finish(admitted)


def punch_all(edit: PoolEdit, ncs: list[int], tables: list[tuple[int, ...]], window: int) -> None:
    """Release, in row order, every running row's blocks before the window of
    its next position (``tables`` updated in place)."""
    bs = edit.pool.block_size
    for i, nc in enumerate(ncs):
        if nc - window + 1 >= bs:
            tables[i] = edit.punch(tables[i], nc, window)


def decode_crossing(rem: list[int], bs: int) -> list[int]:
    """The decode rows (one token each; ``rem``: their positions modulo
    ``bs``) whose token completes a block."""
    return [r for r, x in enumerate(rem) if x == bs - 1] if bs - 1 in rem else []


def chunk_crossing(positions: Sequence[int], token_ids: Sequence[tuple], bs: int, start: int = 0) -> list[int]:
    """The rows from ``start`` on whose new tokens (``token_ids[r]`` from
    position ``positions[r]``) complete at least one block."""
    return [r for r in range(start, len(positions)) if (positions[r] + len(token_ids[r])) // bs != positions[r] // bs]


def host_cache_on(config: EngineConfig) -> bool:
    """Evicted cached device blocks go to the host tier (the host prefix cache)."""
    return config.cache.enable_prefix_caching and config.cache.num_host_blocks > 0


def _every_row_decodes(run: Running, pool, bs: int) -> bool:
    """Every running row has one token to compute (its newest output) and
    owns its tail block unless that block is full (only a fork's rows, n > 1,
    can share a partial tail)."""
    ncs = run.num_computed
    if not decode_ready(run) and (list(map(sub, run.num_tokens, ncs)).count(1) != len(run) or 0 in run.num_output):
        return False
    return traits(run.sampling).max_n == 1 or not any(
        [sp.n > 1 and c % bs and pool.ref[t[-1]] > 1 for sp, c, t in zip(run.sampling, ncs, run.tables)]
    )


def _decode_blocks(ncs: tuple[int, ...], bs: int) -> tuple[list[int], Sequence[int]]:
    """For decode rows whose token is at positions ``ncs``: each position
    modulo ``bs``, and the rows whose token starts a new block (they need one)."""
    rem = list(map(mod, ncs, repeat(bs)))
    return rem, (list(compress(range(len(rem)), map(not_, rem))) if 0 in rem else ())


def _grow_tables(edit: PoolEdit, tables: list, rows: Sequence[int]) -> None:
    """A fresh block at the end of each of ``rows``' tables, taken in row order
    (as the row loop takes them)."""
    for i in rows:
        tables[i] = tables[i] + (edit.take(),)


def _decode_tokens(outputs: tuple) -> tuple:
    """Each decode row's one token to compute: its newest output."""
    return tuple(map(one_token, map(_head, outputs)))


def _all_decode(state: EngineState, config: EngineConfig) -> tuple[EngineState, BatchPlan] | None:
    """Column-wise plan for the common step: nothing waiting, every running row
    decodes one token within budget and blocks, no tail block shared. None
    when any of that does not hold (the general path then decides).

    Every pass over the rows is a C-level ``map``/``compress``: at a few
    hundred rows, one Python-level loop costs as much as the rest together."""
    run, bs = state.running, config.cache.block_size
    n = len(run)
    if not n or state.waiting or n > config.scheduler.max_num_batched_tokens:
        return None
    if not _every_row_decodes(run, state.pool, bs):
        return None
    pool, ncs, tr = state.pool, run.num_computed, traits(run.sampling)
    rem, boundary = _decode_blocks(ncs, bs)
    tables = run.tables
    swap_out = ()
    window = config.cache.sliding_window
    # a row has blocks to release when the block before its first window block is not yet a hole
    punching = window and any([c - window + 1 >= bs and t[(c - window + 1) // bs - 1] != HOLE
                               for c, t in zip(ncs, tables)])
    if boundary or punching:
        edit = PoolEdit(pool, offload=host_cache_on(config))
        tables = list(tables)
        if punching:
            punch_all(edit, list(ncs), tables, window)
        if len(boundary) > edit.num_free:
            return None
        _grow_tables(edit, tables, boundary)
        tables = tuple(tables)
        swap_out = tuple(edit.swaps_out)
        pool = edit.finish()
    running = _replace_running(run, num_computed=tuple(map(add, ncs, repeat(1))), tables=tables)
    plan = BatchPlan(
        step=state.step,
        seq_ids=run.seq_ids,
        request_ids=run.request_ids,
        token_ids=_decode_tokens(run.outputs),
        positions=ncs,
        block_tables=tables,
        num_samples=filled(1, n),
        sample_index=run.indexes,
        output_pos=run.num_output,
        sampling=run.sampling,
        swap_out=swap_out,
        guided_outputs=guided_outputs(run.sampling, run.outputs, run.num_output) if tr.guided else (),
        history=_history(state.requests, run.sampling, filled(1, n), run.outputs, run.num_output, run.request_ids)
        if tr.history else (),
    )
    # the rows whose token completes a block (commit names those blocks)
    note_crossing(plan, bs, decode_crossing(rem, bs))
    return _replace_state(state, pool=pool, running=running, step=state.step + 1), plan
