"""DESIGN.md section 6 as code. Each check raises ``InvariantError`` naming
the invariant (by number) and the blocks, sequences or requests involved.

- :func:`check_pool`: invariants 1, 2, 5 for a pool and the tables holding it.
- :func:`check_invariants`: 1-3, 5, 6 and 9 for a whole state.
- :func:`check_plan`: 4, 7, 8, 12 and 19 for a plan and the states around it.

Tiers add three (to DESIGN.md section 6):
17. A block is in exactly one tier: a running sequence's KV is all in device
    blocks, a swapped one's all in host blocks; a hash is cached in one tier.
18. Reference counts hold per tier: a host block's count is the number of
    swapped sequences' host tables holding it (1, 2 and 6 hold for both pools).
19. No plan reads a block that is not on the device: every block a row reads
    was on the device with that content before the step, or is brought there
    by the plan's own swap_in or copies; swaps name blocks of the right tier.
Sliding window adds one:
20. Holes (:data:`~fnllm.state.HOLE` entries, released blocks) exist only
    with a sliding window, form a leading run of a running or swapped
    sequence's table, and end at or before ``first_window_block(num_computed)``,
    the first block its next step reads; no plan row is handed a hole at or
    after ``first_window_block(position)`` (so the device never reads one).
    Holes hold no reference in any tier.
Speculative decoding adds one:
21. Draft tokens only follow a decode row's last token (a row that samples
    once), at most ``num_speculative_tokens`` and never past ``max_tokens``;
    a block holding uncommitted (draft) KV is never in the prefix cache: every
    cached block a running sequence holds lies within its committed tokens.
Properties over whole runs (10, 11, 13 and 12's "chunks concatenate to the
prompt") are checked by the property tests with these as building blocks.
O(pool): for tests and debugging, never the hot path.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from fnllm.blocks import NO_BLOCK, first_window_block, free_blocks, hash_block
from fnllm.config import EngineConfig
from fnllm.derived import Traits, decode_ready, known_crossing, length_margin, traits
from fnllm.lifecycle import waiting_key
from fnllm.state import COLUMNS, HOLE, BatchPlan, BlockPool, EngineState, InvariantError, SeqStatus, seq_tokens


def _fail(n: int, msg: str) -> None:
    raise InvariantError(f"invariant {n}: {msg}")


def _check_lru(pool: BlockPool) -> None:
    seen, prev, b = 0, NO_BLOCK, pool.lru_head
    while b != NO_BLOCK:
        if pool.lru_prev.get(b, NO_BLOCK) != prev:
            _fail(1, f"LRU list broken at block {b}: prev {pool.lru_prev.get(b)} != {prev}")
        prev, b = b, pool.lru_next.get(b, NO_BLOCK)
        seen += 1
        if seen > pool.num_blocks:
            _fail(1, "LRU list has a cycle")
    if prev != pool.lru_tail or seen != pool.num_lru:
        _fail(1, f"LRU tail {pool.lru_tail} / count {pool.num_lru} disagree with the list ({prev}, {seen})")


def check_pool(pool: BlockPool, tables: Iterable[tuple[int, ...]]) -> None:
    """Invariants 1 (free xor referenced), 2 (refcounts) and 5 (cache content)."""
    _check_lru(pool)
    free = free_blocks(pool)
    dup = [b for b, k in Counter(free).items() if k > 1]
    if dup:
        _fail(1, f"blocks {sorted(dup)[:10]} appear twice in the free list")
    if len(free) != pool.num_free:
        _fail(1, f"free count {pool.num_free} != {len(free)} free blocks")
    both = set(free) & set(pool.ref.keys())
    if both:
        _fail(1, f"blocks {sorted(both)[:10]} are both free and referenced")
    lost = set(range(pool.num_blocks)) - set(free) - set(pool.ref.keys())
    if lost:
        _fail(1, f"blocks {sorted(lost)[:10]} are neither free nor referenced (lost)")
    holders = Counter(b for t in tables for b in t if b != HOLE)
    for b, r in pool.ref.items():
        if r != holders.get(b, 0):
            _fail(2, f"block {b} has reference count {r} but {holders.get(b, 0)} tables hold it")
    extra = set(holders) - set(pool.ref.keys())
    if extra:
        _fail(2, f"blocks {sorted(extra)[:10]} are in tables but have reference count 0")
    _check_cache(pool)


def _check_cache(pool: BlockPool) -> None:
    if len(pool.hash_of) != len(pool.by_hash) or len(pool.content) != len(pool.hash_of):
        _fail(5, "hash maps disagree in size")
    for b, h in pool.hash_of.items():
        if pool.by_hash.get(h) != b:
            _fail(5, f"block {b}'s hash does not map back to it")
        parent, toks, extra = pool.content[b]
        if len(toks) != pool.block_size:
            _fail(5, f"cached block {b} is not full ({len(toks)} of {pool.block_size} tokens)")
        if hash_block(parent, toks, extra) != h:
            _fail(5, f"cached block {b}'s content does not give its hash")
    for b in free_blocks(pool):
        if b >= pool.fresh and b in pool.hash_of:
            _fail(5, f"never-used block {b} is cached")


def check_tiers(state: EngineState, config: EngineConfig) -> None:
    """Invariants 17 and 18 (and 1, 2, 5, 6 for the host pool)."""
    pool, host, bs = state.pool, state.pool.host, config.cache.block_size
    if host is None or host.num_blocks != config.cache.num_host_blocks:
        _fail(18, f"host tier has {None if host is None else host.num_blocks} blocks, config says {config.cache.num_host_blocks}")
    if host.host is not None:
        _fail(17, "the host pool has a tier below it")
    check_pool(host, [s.swapped for s in state.waiting])
    for s in state.waiting:
        if (s.status == SeqStatus.SWAPPED) != bool(s.swapped):
            _fail(17, f"waiting seq {s.seq_id} has status {s.status.value} and host blocks {list(s.swapped)[:10]}")
        if s.swapped:
            total = len(state.requests[s.request_id].prompt_token_ids) + s.num_output
            if not 0 < s.num_computed < total or len(s.swapped) != -(-s.num_computed // bs):
                _fail(17, f"swapped seq {s.seq_id} holds {len(s.swapped)} host blocks for {s.num_computed} of {total} tokens")
        elif s.num_computed:
            _fail(17, f"waiting seq {s.seq_id} counts {s.num_computed} computed tokens but holds no KV")
        if s.swapped:
            check_holes(s.swapped, s.num_computed, config, f"swapped seq {s.seq_id}")
    for t in state.running.tables:
        if any(not 0 <= b < pool.num_blocks for b in t if b != HOLE):
            _fail(17, f"a running table holds ids outside the device pool: {list(t)[:10]}")
    both = set(pool.by_hash.keys()) & set(host.by_hash.keys())
    if both:
        _fail(17, f"{len(both)} hashes are cached in both tiers")
    if not state.requests and host.num_free != host.num_blocks:
        _fail(6, f"no live request but {host.num_blocks - host.num_free} host blocks are held")


def check_invariants(state: EngineState, config: EngineConfig) -> None:
    """Every invariant that a single state must satisfy (1-3, 5, 6, 9, 10's queue order, 17, 18)."""
    run, pool, bs = state.running, state.pool, config.cache.block_size
    check_pool(pool, run.tables)
    check_tiers(state, config)
    n = len(run)
    # between schedule and commit a row may count up to k draft tokens beyond its own (speculative decoding)
    k_spec = config.speculative.num_speculative_tokens if config.speculative is not None else 0
    for name in COLUMNS:
        if len(getattr(run, name)) != n:
            _fail(9, f"running column {name} has {len(getattr(run, name))} rows, expected {n}")
    for i in range(n):
        rid, nc, table = run.request_ids[i], run.num_computed[i], run.tables[i]
        req = state.requests.get(rid)
        if req is None:
            _fail(9, f"running seq {run.seq_ids[i]} belongs to unknown request {rid!r}")
        total = len(req.prompt_token_ids) + run.num_output[i]
        if run.num_tokens[i] != total or run.sampling[i] is not req.sampling:
            _fail(9, f"seq {run.seq_ids[i]}'s cached columns disagree with its request")
        if not 0 < nc <= total + k_spec:
            _fail(12, f"seq {run.seq_ids[i]} has num_computed {nc} outside (0, {total + k_spec}]")
        if len(table) != -(-nc // bs):
            _fail(3, f"seq {run.seq_ids[i]} holds {len(table)} blocks for {nc} computed tokens (block size {bs})")
        check_holes(table, nc, config, f"seq {run.seq_ids[i]}")
        _check_cached_content(state, i, req)
    _check_places(state)
    _check_waiting_order(state, config.scheduler.policy)
    _check_derived(state)
    if not state.requests and pool.num_free != pool.num_blocks:
        _fail(6, f"no live request but {pool.num_blocks - pool.num_free} blocks are held: {sorted(pool.ref.keys())[:10]}")


def _check_waiting_order(state: EngineState, policy: str) -> None:
    """Invariant 10's precondition: the waiting queue is in admission order
    (FCFS by arrival, or priority then arrival; a preempted sequence keeps
    its original position)."""
    keys = [waiting_key(state.requests[s.request_id], s, policy) for s in state.waiting]
    for j in range(1, len(keys)):
        if keys[j] < keys[j - 1]:
            _fail(10, f"waiting seq {state.waiting[j].seq_id} (key {keys[j]}) is queued after "
                      f"seq {state.waiting[j - 1].seq_id} (key {keys[j - 1]}) under {policy}")


def _check_derived(state: EngineState) -> None:
    """What :mod:`fnllm.derived` memoized for the running columns is true of them."""
    run = state.running
    if decode_ready(run) and (any(t - c != 1 for t, c in zip(run.num_tokens, run.num_computed)) or 0 in run.num_output):
        _fail(9, "running rows noted decode-ready have more than one token to compute, or no output")
    if traits(run.sampling) != Traits.of(run.sampling):
        _fail(9, "the memoized traits of the sampling column disagree with the column")
    margin = min((sp.max_tokens - k for sp, k in zip(run.sampling, run.num_output)), default=1 << 62)
    if length_margin(run.sampling, run.num_output) != margin:
        _fail(9, f"the memoized length margin disagrees with the columns ({margin})")


def check_holes(table: tuple[int, ...], nc: int, config: EngineConfig, who: str) -> None:
    """Invariant 20 for one table whose next step starts at ``nc``."""
    holes = 0
    while holes < len(table) and table[holes] == HOLE:
        holes += 1
    if HOLE in table[holes:]:
        _fail(20, f"{who}'s holes are not a leading run: {list(table)[:12]}")
    w = config.cache.sliding_window
    if holes and not w:
        _fail(20, f"{who} has {holes} holes without a sliding window")
    if holes > first_window_block(nc, w, config.cache.block_size):
        _fail(20, f"{who} has {holes} holes but its next step (at {nc}) reads from block "
                  f"{first_window_block(nc, w, config.cache.block_size)}")


def _check_cached_content(state: EngineState, i: int, req) -> None:
    """Invariant 5 from the sequence side: a cached block it holds has its tokens."""
    run, pool, bs = state.running, state.pool, state.pool.block_size
    committed = min(run.num_computed[i], run.num_tokens[i])
    for j, b in enumerate(run.tables[i][committed // bs :], start=committed // bs):
        if b in pool.hash_of:
            _fail(21, f"seq {run.seq_ids[i]} block {j} (id {b}) is cached but holds KV past its {committed} committed tokens")
    for j, b in enumerate(run.tables[i][: run.num_computed[i] // bs]):
        if b == HOLE:
            continue
        content = pool.content.get(b)
        if content is None:
            continue
        toks = seq_tokens(req.prompt_token_ids, run.outputs[i], run.num_output[i], j * bs, (j + 1) * bs)
        if tuple(content[1]) != toks:
            _fail(5, f"seq {run.seq_ids[i]} block {j} (id {b}) is cached with other tokens")


def _check_places(state: EngineState) -> None:
    """Invariant 9: each sequence in one place; request bookkeeping agrees."""
    run = state.running
    ids = list(run.seq_ids) + [s.seq_id for s in state.waiting]
    dup = [s for s, k in Counter(ids).items() if k > 1]
    if dup:
        _fail(9, f"sequences {dup[:10]} are in more than one place")
    for s in state.waiting:
        if s.status not in (SeqStatus.WAITING, SeqStatus.PREEMPTED, SeqStatus.SWAPPED):
            _fail(9, f"waiting seq {s.seq_id} has status {s.status}")
        if s.request_id not in state.requests:
            _fail(9, f"waiting seq {s.seq_id} belongs to unknown request {s.request_id!r}")
    per_req = Counter(list(run.request_ids) + [s.request_id for s in state.waiting])
    if set(per_req) != set(state.requests.keys()):
        _fail(9, f"requests without sequences: {sorted(set(state.requests.keys()) - set(per_req))[:10]}")
    for rid, k in per_req.items():
        if state.alive.get(rid) != k:
            _fail(9, f"request {rid!r} has {k} live sequences but alive says {state.alive.get(rid)}")
    pairs = Counter(list(zip(run.request_ids, run.indexes)) + [(s.request_id, s.index) for s in state.waiting])
    twice = [p for p, k in pairs.items() if k > 1]
    if twice:
        _fail(9, f"(request, index) pairs {twice[:5]} appear twice")


def check_plan(before: EngineState, after: EngineState, plan: BatchPlan, config: EngineConfig) -> None:
    """Invariants 4, 7, 8 and 12 for ``(after, plan) = schedule(before)``."""
    sc, bs = config.scheduler, config.cache.block_size
    if plan.num_tokens > sc.max_num_batched_tokens:
        _fail(7, f"plan schedules {plan.num_tokens} tokens > max_num_batched_tokens={sc.max_num_batched_tokens}")
    if len(plan) > sc.max_num_seqs:
        _fail(7, f"plan schedules {len(plan)} sequences > max_num_seqs={sc.max_num_seqs}")
    if len(set(plan.seq_ids)) != len(plan):
        _fail(7, "a sequence is scheduled twice")
    row_of = {sid: i for i, sid in enumerate(after.running.seq_ids)}
    prev = dict(zip(before.running.seq_ids, before.running.num_computed))
    drafts = plan.num_draft_tokens or (0,) * len(plan)
    if len(drafts) != len(plan):
        _fail(21, f"plan has {len(drafts)} draft counts for {len(plan)} rows")
    for r, sid in enumerate(plan.seq_ids):
        toks, pos, table = plan.token_ids[r], plan.positions[r], plan.block_tables[r]
        if not toks:
            _fail(8, f"seq {sid} is scheduled with no tokens")
        i = row_of.get(sid)
        if i is None or after.running.tables[i] != table:
            _fail(8, f"seq {sid}'s plan table differs from its state table")
        if len(table) * bs < pos + len(toks):
            _fail(8, f"seq {sid} computes up to position {pos + len(toks)} with only {len(table)} blocks")
        for j in range(pos // bs, (pos + len(toks) - 1) // bs + 1):
            if after.pool.ref.get(table[j], 0) != 1:
                _fail(4, f"seq {sid} writes block {table[j]} whose reference count is {after.pool.ref.get(table[j], 0)}")
        if sid in prev and pos != prev[sid]:
            _fail(12, f"seq {sid} was at {prev[sid]} computed tokens but its row starts at {pos}")
        if after.running.num_computed[i] != pos + len(toks):
            _fail(12, f"seq {sid}'s counter {after.running.num_computed[i]} != {pos + len(toks)}")
        req = after.requests[plan.request_ids[r]]
        total = len(req.prompt_token_ids) + after.running.num_output[i]
        d = drafts[r]
        own = len(toks) - d
        _check_drafts(config, plan, r, d, own, after.running.num_output[i])
        want = seq_tokens(req.prompt_token_ids, after.running.outputs[i], after.running.num_output[i], pos, pos + own)
        if tuple(toks[:own]) != want or pos + own > total:
            _fail(12, f"seq {sid}'s planned tokens are not its tokens {pos}..{pos + own}")
    known = known_crossing(plan, bs)
    if known is not None and known != [r for r, (p, t) in enumerate(zip(plan.positions, plan.token_ids)) if (p + len(t)) // bs != p // bs]:
        _fail(9, f"the rows noted as completing a block ({known[:10]}) are not the plan's")
    in_tables = {b for t in plan.block_tables for b in t}
    for _, dst in plan.copies:
        if dst not in in_tables:
            _fail(4, f"copy target block {dst} is in no scheduled table")
    check_plan_reads(before, after, plan, config)
    planned = set(plan.seq_ids)
    for sid, nc in zip(after.running.seq_ids, after.running.num_computed):
        if sid not in planned and sid in prev and nc != prev[sid]:
            _fail(12, f"unscheduled seq {sid}'s counter moved from {prev[sid]} to {nc}")


def _check_drafts(config: EngineConfig, plan: BatchPlan, r: int, d: int, own: int, num_output: int) -> None:
    """Invariant 21 for a plan row: drafts only follow a row's last token,
    on a row that samples once and has sampled before, at most k of them,
    and never past ``max_tokens``."""
    if not d:
        return
    spec, sp = config.speculative, plan.sampling[r]
    sid = plan.seq_ids[r]
    if spec is None or d > spec.num_speculative_tokens or d < 0:
        _fail(21, f"seq {sid} carries {d} draft tokens (speculative config: {spec})")
    if own < 1 or plan.num_samples[r] != 1 or num_output < 1:
        _fail(21, f"seq {sid}'s drafts are on a row that does not sample its own last token once")
    if num_output + d + 1 > sp.max_tokens:
        _fail(21, f"seq {sid}'s {d} drafts could run past max_tokens={sp.max_tokens} from {num_output} tokens")


def _check_swaps(before: EngineState, after: EngineState, plan: BatchPlan) -> None:
    """Invariant 19 for the moves: each names blocks of the right tier, once."""
    nd, nh = before.pool.num_blocks, before.pool.host.num_blocks
    outs, ins = plan.swap_out, plan.swap_in
    for d, h in outs:
        if not (0 <= d < nd and 0 <= h < nh):
            _fail(19, f"swap_out ({d}, {h}) names a block outside its tier")
        if before.pool.ref.get(d, 0) == 0 and d not in before.pool.hash_of:
            _fail(19, f"swap_out reads device block {d}, which held nothing before the step")
    for h, d in ins:
        if not (0 <= d < nd and 0 <= h < nh):
            _fail(19, f"swap_in ({h}, {d}) names a block outside its tier")
    # (a host block shared by forked sequences may be a source twice)
    for what, col in (("swap_out targets", [h for _, h in outs]), ("swap_in targets", [d for _, d in ins])):
        dup = [b for b, k in Counter(col).items() if k > 1]
        if dup:
            _fail(19, f"{what} {dup[:10]} appear twice in one plan")
    written = {h for _, h in outs}
    for h, _ in ins:
        hb = before.pool.host
        if h not in written and hb.ref.get(h, 0) == 0 and h not in hb.hash_of:
            _fail(19, f"swap_in reads host block {h}, which held nothing before the step")
    was = dict(zip(before.running.seq_ids, before.running.tables))
    source = {h: d for d, h in outs}
    for s in after.waiting:
        if s.swapped and s.seq_id in was:  # swapped out by this plan
            for j, h in enumerate(s.swapped):
                if h != HOLE and source.get(h) != was[s.seq_id][j]:
                    _fail(19, f"seq {s.seq_id}'s host block {h} is not written from its device block {was[s.seq_id][j]}")


def check_plan_reads(before: EngineState, after: EngineState, plan: BatchPlan, config: EngineConfig) -> None:
    """Invariant 19: every block a row reads is on the device with its content."""
    bs = config.cache.block_size
    _check_swaps(before, after, plan)
    was = dict(zip(before.running.seq_ids, before.running.tables))
    brought = {d for _, d in plan.swap_in} | {d for _, d in plan.copies}
    swapped_in = {d: h for h, d in plan.swap_in}
    host_of = {s.seq_id: s.swapped for s in before.waiting if s.swapped}
    # the two pools' reads, one version at a time (each read of the other reroots the store)
    blocks = {b for t in plan.block_tables for b in t if b != HOLE}
    ref, cached = after.pool.ref, before.pool.hash_of
    held = {b for b in blocks if ref.get(b, 0) >= 1}
    was_cached = {b for b in blocks if b in cached}
    for r, sid in enumerate(plan.seq_ids):
        table, pos = plan.block_tables[r], plan.positions[r]
        old = was.get(sid, ())
        first = first_window_block(pos, config.cache.sliding_window, bs)
        for j in range(first, -(-(pos + len(plan.token_ids[r])) // bs)):
            b = table[j]
            if b == HOLE:
                _fail(20, f"seq {sid} is handed a hole at block {j}, inside the window of position {pos}")
            if not 0 <= b < after.pool.num_blocks or b not in held:
                _fail(19, f"seq {sid} reads block {b}, which is not a held device block")
            if j * bs >= pos:
                continue  # written before it is read
            ok = (j < len(old) and old[j] == b) or b in brought or (
                b in was_cached and sid not in host_of
            )
            if not ok:
                _fail(19, f"seq {sid} reads block {j} (id {b}) of its table, whose content is not on the device")
            if sid in host_of and j < len(host_of[sid]) and swapped_in.get(b) != host_of[sid][j]:
                _fail(19, f"swapped seq {sid}'s block {j} comes back from host {swapped_in.get(b)}, not {host_of[sid][j]}")
