"""Request lifecycle as pure functions: create, add, abort, finish.

``add_request`` answers a request that can never be served with a
:class:`~fnllm.state.Rejection` value naming the reason, and leaves the state
as it was; every other function here returns a new state and never mutates
its argument. Removing a sequence always returns all of its blocks (device
blocks when running, host blocks when swapped).
"""

from __future__ import annotations

from bisect import bisect_right

import attrs

from fnllm.blocks import PoolEdit, chain_hashes, new_pool
from fnllm.config import EngineConfig
from fnllm.replace import replacer
from fnllm.state import COLUMNS, EngineState, Rejection, Request, Running, Seq

_replace_state = replacer(EngineState)
_admitted = replacer(Request, ("arrival", "block_hashes"))  # the two fields add_request sets


def initial_state(config: EngineConfig) -> EngineState:
    c = config.cache
    return EngineState(pool=new_pool(c.num_blocks, c.block_size, c.num_host_blocks))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def waiting_key(req: Request, seq: Seq, policy: str) -> tuple:
    """Admission order: FCFS by arrival, or priority (lower first) then arrival."""
    if policy == "priority":
        return (req.priority, req.arrival, seq.index)
    return (req.arrival, seq.index)


def insert_waiting(state_requests, waiting: tuple[Seq, ...], seqs: list[Seq], policy: str) -> tuple[Seq, ...]:
    """``waiting`` with ``seqs`` placed in admission order (after equal keys).

    ``waiting`` is already in order, so each sequence goes in by binary
    search: O(log n) key computations plus one tuple copy, and O(1) key
    computations for the usual FCFS add (a new arrival goes last).
    """
    if not seqs:
        return waiting

    def key(s: Seq) -> tuple:
        return waiting_key(state_requests[s.request_id], s, policy)

    if len(seqs) == 1 and (not waiting or key(waiting[-1]) <= key(seqs[0])):
        return waiting + (seqs[0],)  # the usual add: one tuple copy, no search
    out = list(waiting)
    for seq in sorted(seqs, key=key):
        out.insert(bisect_right(out, key(seq), key=key), seq)
    return tuple(out)


def max_blocks_held(total: int, config: EngineConfig) -> int:
    """The most device blocks one sequence of ``total`` tokens (prompt +
    max_tokens) holds at once. Without a window, all but the last token's.
    With a sliding window W, a step computing ``n <= cap`` tokens from
    position ``pos`` holds blocks ``first_window_block(pos) ..
    (pos + n - 1) // bs`` only (its older blocks were released first): at
    most ``ceil((W + n + bs - 2) / bs)``."""
    bs, sched, w = config.cache.block_size, config.scheduler, config.cache.sliding_window
    need = blocks_for(total - 1, bs)
    if w:
        cap = min(sched.long_prefill_token_threshold or sched.max_num_batched_tokens, total - 1)
        need = min(need, blocks_for(w + cap + bs - 2, bs))
    return need


def validate_request(state: EngineState, request: Request, config: EngineConfig) -> str | None:
    """Why ``request`` can never be served, or None."""
    prompt = request.prompt_token_ids
    sp = request.sampling
    sched, cache = config.scheduler, config.cache
    if not isinstance(request.request_id, str) or not request.request_id:
        return "request_id must be a non-empty string"
    if request.request_id in state.requests:
        return f"request_id {request.request_id!r} is already in use by a live request"
    if not prompt:
        return "prompt is empty"
    vocab = config.model.vocab_size
    ints = set(map(type, prompt)) == {int}  # exact ints: bools (an int subclass) are not token ids
    bad = () if ints and min(prompt) >= 0 and max(prompt) < vocab else [
        t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
    ]
    if bad:
        return f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
    total = len(prompt) + sp.max_tokens
    if len(prompt) > sched.max_model_len:
        return f"prompt has {len(prompt)} tokens, more than max_model_len={sched.max_model_len}"
    if total > sched.max_model_len:
        return (
            f"prompt ({len(prompt)} tokens) + max_tokens ({sp.max_tokens}) = {total} "
            f"exceeds max_model_len={sched.max_model_len}"
        )
    need = max_blocks_held(total, config)
    if need > cache.num_blocks:
        return (
            f"request needs {need} KV blocks of {cache.block_size} tokens, "
            f"but the whole cache has {cache.num_blocks}: it could never be scheduled"
        )
    if sp.logprobs is not None and sp.logprobs > config.model.max_logprobs:
        return f"logprobs={sp.logprobs} exceeds max_logprobs={config.model.max_logprobs}"
    if sp.logprobs is not None and sp.logprobs > vocab:
        return f"logprobs={sp.logprobs} exceeds the vocabulary size {vocab}"
    if sp.n > sched.max_num_seqs:
        return f"n={sp.n} exceeds max_num_seqs={sched.max_num_seqs}"
    reason = _check_processing(sp, config)
    if reason is not None:
        return reason
    if not sched.enable_chunked_prefill and len(prompt) > sched.max_num_batched_tokens:
        return f"prompt has {len(prompt)} tokens, more than max_num_batched_tokens with chunked prefill off"
    return None


def _check_processing(sp, config: EngineConfig) -> str | None:
    """The logits-processing parameters against the vocabulary and limits (vLLM's checks)."""
    if (sp.prompt_logprobs is None and sp.truncate_prompt_tokens is None and not sp.logit_bias
            and not sp.allowed_token_ids and not sp.bad_words_token_ids):
        return None  # the usual request: nothing to check
    vocab, top = config.model.vocab_size, config.model.max_logprobs
    if sp.prompt_logprobs is not None and sp.prompt_logprobs > min(top, vocab):
        return f"prompt_logprobs={sp.prompt_logprobs} exceeds max_logprobs={top} (vocabulary size {vocab})"
    if sp.truncate_prompt_tokens is not None and sp.truncate_prompt_tokens > config.scheduler.max_model_len:
        return (f"truncate_prompt_tokens={sp.truncate_prompt_tokens} exceeds "
                f"max_model_len={config.scheduler.max_model_len}")
    for name, ids in (("logit_bias", sp.logit_bias.keys()), ("allowed_token_ids", sp.allowed_token_ids or ()),
                      ("bad_words", [t for w in sp.bad_words_token_ids for t in w])):
        bad = sorted({t for t in ids if t >= vocab})
        if bad:
            return f"{name} holds token ids {bad[:5]} outside the vocabulary [0, {vocab})"
    return None


def truncated(request: Request) -> Request:
    """``request`` with only the last ``truncate_prompt_tokens`` prompt tokens (idempotent)."""
    k = request.sampling.truncate_prompt_tokens
    if k is None or len(request.prompt_token_ids) <= k:
        return request
    return attrs.evolve(request, prompt_token_ids=request.prompt_token_ids[-k:])


def add_request(state: EngineState, request: Request, config: EngineConfig) -> EngineState | Rejection:
    """Queue ``request`` (its ``arrival`` is assigned here; its prompt cut to
    ``truncate_prompt_tokens``), or reject it."""
    request = truncated(request)
    reason = validate_request(state, request, config)
    if reason is not None:
        return Rejection(request_id=str(request.request_id), reason=reason)
    hashes = ()
    if config.cache.enable_prefix_caching:
        hashes = chain_hashes(request.prompt_token_ids, config.cache.block_size, request.extra_keys)
    req = _admitted(request, arrival=state.next_arrival, block_hashes=hashes)
    seq = Seq(seq_id=state.next_seq_id, request_id=req.request_id, hashes=hashes)
    requests = state.requests.set(req.request_id, req)
    return _replace_state(
        state,
        requests=requests,
        alive=state.alive.set(req.request_id, 1),
        waiting=insert_waiting(requests, state.waiting, [seq], config.scheduler.policy),
        next_seq_id=state.next_seq_id + 1,
        next_arrival=state.next_arrival + 1,
    )


def remove_rows(state: EngineState, keep: list[bool]) -> tuple[Running, list[tuple[int, ...]]]:
    """Running without the rows where ``keep`` is False, and those rows' tables."""
    run = state.running
    dropped = [t for t, k in zip(run.tables, keep) if not k]
    cols = {c: tuple(v for v, k in zip(getattr(run, c), keep) if k) for c in COLUMNS}
    return Running(**cols), dropped


def _drop(state: EngineState, request_id: str, index: int | None) -> EngineState:
    """Remove the request's sequences (all, or the one with ``index``), freeing their blocks."""

    def hit(rid: str, idx: int) -> bool:
        return rid == request_id and (index is None or idx == index)

    run = state.running
    keep = [not hit(r, i) for r, i in zip(run.request_ids, run.indexes)]
    waiting = tuple(s for s in state.waiting if not hit(s.request_id, s.index))
    swapped = [s.swapped for s in state.waiting if s.swapped and hit(s.request_id, s.index)]
    removed = keep.count(False) + len(state.waiting) - len(waiting)
    if removed == 0:
        return state
    running, tables = remove_rows(state, keep)
    edit = PoolEdit(state.pool)
    for t in tables:
        edit.free_table(t)
    for t in swapped:  # a swapped sequence's host blocks
        edit.host.free_table(t)
    left = state.alive[request_id] - removed
    requests, alive = state.requests, state.alive
    if left == 0:
        requests, alive = requests.delete(request_id), alive.delete(request_id)
    else:
        alive = alive.set(request_id, left)
    return attrs.evolve(
        state, pool=edit.finish(), running=running, waiting=waiting, requests=requests, alive=alive
    )


def abort_request(state: EngineState, request_id: str) -> EngineState:
    """Drop every sequence of ``request_id``; an unknown or finished id changes nothing."""
    if request_id not in state.requests:
        return state
    return _drop(state, request_id, None)


def finish_sequence(state: EngineState, request_id: str, index: int) -> EngineState:
    """End one sequence of a request (e.g. a stop string the engine found in its text)."""
    if request_id not in state.requests:
        return state
    return _drop(state, request_id, index)


def stage_blocks(state: EngineState, request_id: str, first: int, count: int) -> tuple[EngineState, tuple[int, ...]]:
    """Name prompt blocks ``first .. first+count-1`` of a waiting request in
    the host tier, as free cached blocks (the disk tier's reads land there;
    the shell then fills those host blocks). Returns the host block of each,
    in order; fewer than ``count`` when the host tier runs out of free blocks
    or a block is already cached in some tier (staging stops there)."""
    req = state.requests.get(request_id)
    if req is None or count <= 0:
        return state, ()
    pool, bs = state.pool, state.pool.block_size
    edit = PoolEdit(pool)
    host, got = edit.host, []
    hashes, prompt = req.block_hashes, req.prompt_token_ids
    for j in range(first, min(first + count, len(hashes))):
        h = hashes[j]
        if h in edit.by_hash or h in host.by_hash or host.num_free <= 0:
            break
        b = host.take()
        host.cache(b, h, (hashes[j - 1] if j else None, prompt[j * bs : (j + 1) * bs], req.extra_keys))
        got.append(b)
    for b in got:  # free and cached: evictable like any cached host block
        host.decref(b)
    return attrs.evolve(state, pool=edit.finish()), tuple(got)
