"""``schedule(state, config, now=...) -> (state, plan)``: one step's decisions.

vLLM v1's scheduling model as a pure function. Every sequence has one
counter, ``num_computed``, catching up with its token count. Running
sequences are served first, in admission order, each taking as many tokens
as the budget (``max_num_batched_tokens``) and the long-prefill cap allow;
then, if nothing was preempted, waiting sequences are admitted in policy
order (FCFS, or priority then arrival), strictly: the first that does not
fit stops admission. A new sequence starts with its longest cached prefix
counted as computed. When blocks run out, the lowest-priority, latest
running sequence is preempted by recompute (blocks freed, counter reset,
output kept) and returns to the waiting queue in its original order.

The returned state already counts the planned tokens as computed and holds
their blocks; ``commit`` adds the sampled tokens. Every block a plan row
writes into has reference count 1 (shared partial blocks are copied first,
the copy listed in ``plan.copies``).
"""

from __future__ import annotations

import attrs

from fnllm.blocks import PoolEdit
from fnllm.config import EngineConfig
from fnllm.lifecycle import insert_waiting
from fnllm.state import COLUMNS, BatchPlan, EngineState, Request, Running, Seq, SeqStatus, seq_tokens


class _Row:
    """A plan row under construction (local to one schedule call)."""

    __slots__ = ("tokens", "pos", "samples", "copies")

    def __init__(self, tokens, pos, samples, copies):
        self.tokens, self.pos, self.samples, self.copies = tokens, pos, samples, copies


class _Step:
    """Local, mutable working copy of one scheduling step; frozen by ``finish``."""

    def __init__(self, state: EngineState, config: EngineConfig) -> None:
        self.state, self.config = state, config
        self.bs = config.cache.block_size
        sc = config.scheduler
        self.budget = sc.max_num_batched_tokens
        self.cap = sc.long_prefill_token_threshold or sc.max_num_batched_tokens
        self.chunking = sc.enable_chunked_prefill
        self.policy = sc.policy
        self.requests = state.requests
        self.edit = PoolEdit(state.pool)
        run = state.running
        self.cols = {c: list(getattr(run, c)) for c in COLUMNS}
        self.live = [True] * len(run)
        self.rows: dict[int, _Row] = {}  # running row index -> plan row
        self.preempted: list[Seq] = []
        self.idle_reason = ""

    # -- helpers ------------------------------------------------------------------
    def _num_tokens(self, i: int) -> int:
        req = self.requests[self.cols["request_ids"][i]]
        return len(req.prompt_token_ids) + self.cols["num_output"][i]

    def _victim(self) -> int | None:
        """Row to preempt: the latest running (FCFS) or lowest priority, then latest."""
        live = [i for i, ok in enumerate(self.live) if ok]
        if not live:
            return None
        if self.policy != "priority":
            return live[-1]
        rids = self.cols["request_ids"]

        def key(i: int) -> tuple:
            r = self.requests[rids[i]]
            return (r.priority, r.arrival, self.cols["indexes"][i], i)

        return max(live, key=key)

    def _preempt(self, i: int) -> None:
        c = self.cols
        row = self.rows.pop(i, None)
        if row is not None:  # planned earlier this step: give its tokens back
            self.budget += len(row.tokens)
        self.edit.free_table(c["tables"][i])
        self.live[i] = False
        self.preempted.append(
            Seq(
                seq_id=c["seq_ids"][i],
                request_id=c["request_ids"][i],
                index=c["indexes"][i],
                status=SeqStatus.PREEMPTED,
                output=c["outputs"][i],
                num_output=c["num_output"][i],
                hashes=c["hashes"][i],
            )
        )

    def _grow(self, table: list[int], nc: int, new: int, copies: list) -> bool:
        """Blocks for tokens [nc, nc+new), copying a shared partial block first."""
        edit, bs = self.edit, self.bs
        if nc % bs and edit.ref[table[nc // bs]] > 1 and not edit.writable(table, nc // bs, copies):
            return False
        need = -(-(nc + new) // bs) - len(table)
        if need > 0:
            got = edit.allocate(need)
            if got is None:
                return False
            table.extend(got)
        return True

    def _free_needed(self, table: tuple[int, ...], nc: int, new: int) -> int:
        bs = self.bs
        cow = 1 if nc % bs and self.edit.ref[table[nc // bs]] > 1 else 0
        return cow + max(0, -(-(nc + new) // bs) - len(table))

    @staticmethod
    def _width(req: Request, num_output: int) -> int:
        """Sequences a row will occupy: ``n`` for a request that has yet to fork."""
        return req.sampling.n if num_output == 0 else 1

    # -- running sequences -----------------------------------------------------------
    def schedule_running(self) -> None:
        c = self.cols
        for i in range(len(self.live)):
            if self.budget <= 0:
                break
            if not self.live[i]:
                continue
            nc = c["num_computed"][i]
            new = min(self._num_tokens(i) - nc, self.cap, self.budget)
            while self.live[i] and self.edit.num_free < self._free_needed(c["tables"][i], nc, new):
                self._preempt(self._victim())
            if not self.live[i]:
                continue
            t, copies = list(c["tables"][i]), []
            if not self._grow(t, nc, new, copies):
                raise AssertionError("allocation failed after making room")  # pragma: no cover
            c["tables"][i] = tuple(t)
            self._plan(i, nc, new, copies)

    def _plan(self, i: int, nc: int, new: int, copies: list) -> None:
        c = self.cols
        req: Request = self.requests[c["request_ids"][i]]
        nout = c["num_output"][i]
        total = len(req.prompt_token_ids) + nout
        if new == 1 and nc == total - 1 and nout:
            tokens = (c["outputs"][i][0],)
        else:
            tokens = seq_tokens(req.prompt_token_ids, c["outputs"][i], nout, nc, nc + new)
        samples = 0
        if nc + new == total:
            samples = self._width(req, nout)
        c["num_computed"][i] = nc + new
        self.budget -= new
        self.rows[i] = _Row(tokens, nc, samples, copies)

    # -- waiting sequences ------------------------------------------------------------
    def admit_waiting(self) -> int:
        """Admit waiting sequences in order; the number admitted."""
        sc = self.config.scheduler
        waiting = self.state.waiting
        c = self.cols
        n_running = sum(
            self._width(self.requests[r], nout)
            for r, nout, ok in zip(c["request_ids"], c["num_output"], self.live)
            if ok
        )
        k = 0
        while k < len(waiting) and self.budget > 0:
            seq = waiting[k]
            req = self.requests[seq.request_id]
            width = self._width(req, seq.num_output)
            if n_running + width > sc.max_num_seqs:
                self.idle_reason = self.idle_reason or f"max_num_seqs={sc.max_num_seqs} reached"
                break
            if not self._admit(seq, req):
                break
            n_running += width
            k += 1
        return k

    def _admit(self, seq: Seq, req: Request) -> bool:
        bs, edit = self.bs, self.edit
        total = len(req.prompt_token_ids) + seq.num_output
        hits: list[int] = []
        if self.config.cache.enable_prefix_caching:
            hits = edit.lookup(seq.hashes[: (total - 1) // bs])
        nc = len(hits) * bs
        new = min(total - nc, self.cap)
        if self.chunking:
            new = min(new, self.budget)
        elif new > self.budget:
            self.idle_reason = f"request {req.request_id!r} needs {new} tokens, budget left {self.budget}"
            return False
        need = -(-(nc + new) // bs) - len(hits)
        evictable = sum(1 for b in hits if edit.ref.get(b, 0) == 0)
        if edit.num_free - evictable < need:
            self.idle_reason = (
                f"request {req.request_id!r} needs {need} free KV blocks, "
                f"{edit.num_free - evictable} are free"
            )
            return False
        for b in hits:
            edit.incref(b)
        table = hits + edit.allocate(need)
        c = self.cols
        for name, v in (
            ("seq_ids", seq.seq_id),
            ("request_ids", seq.request_id),
            ("indexes", seq.index),
            ("num_computed", nc),
            ("num_output", seq.num_output),
            ("outputs", seq.output),
            ("tables", tuple(table)),
            ("hashes", seq.hashes),
        ):
            c[name].append(v)
        self.live.append(True)
        self._plan(len(self.live) - 1, nc, new, [])
        return True

    # -- result -------------------------------------------------------------------------
    def finish(self, n_admitted: int) -> tuple[EngineState, BatchPlan]:
        state, c = self.state, self.cols
        live = self.live
        if all(live):
            running = Running(**{k: tuple(v) for k, v in c.items()})
        else:
            running = Running(**{k: tuple(x for x, ok in zip(v, live) if ok) for k, v in c.items()})
        waiting = insert_waiting(self.requests, state.waiting[n_admitted:], self.preempted, self.policy)
        new_state = attrs.evolve(
            state, pool=self.edit.finish(), running=running, waiting=waiting, step=state.step + 1
        )
        return new_state, self._build_plan()

    def _build_plan(self) -> BatchPlan:
        c = self.cols
        order = sorted(self.rows)
        rows = [self.rows[i] for i in order]
        rids = [c["request_ids"][i] for i in order]
        reason = self.idle_reason
        if not rows:
            reason = reason or ("no requests" if not self.state.requests else "nothing schedulable")
        return BatchPlan(
            step=self.state.step,
            seq_ids=tuple(c["seq_ids"][i] for i in order),
            request_ids=tuple(rids),
            token_ids=tuple(r.tokens for r in rows),
            positions=tuple(r.pos for r in rows),
            block_tables=tuple(c["tables"][i] for i in order),
            num_samples=tuple(r.samples for r in rows),
            sample_index=tuple(c["indexes"][i] for i in order),
            output_pos=tuple(c["num_output"][i] for i in order),
            sampling=tuple(self.requests[r].sampling for r in rids),
            copies=tuple(cp for r in rows for cp in r.copies),
            idle_reason="" if rows else reason,
        )


def schedule(state: EngineState, config: EngineConfig, *, now: float = 0.0) -> tuple[EngineState, BatchPlan]:
    """Plan the next step. ``now`` is accepted for the engine's clock but no
    decision depends on it (scheduling is a function of the state alone)."""
    step = _Step(state, config)
    step.schedule_running()
    admitted = 0 if step.preempted else step.admit_waiting()
    return step.finish(admitted)
