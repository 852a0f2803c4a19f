"""N-gram speculative decoding (prompt lookup), pure.

Proposal (:func:`propose`): the sequence's own history (prompt + output) is
searched for the most recent earlier occurrence of its last ``n`` tokens,
``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``; the tokens
that followed that occurrence (up to ``num_speculative_tokens``) are the
drafts. :func:`plan_drafts` appends them to a step's decode rows after every
other decision of the step (so speculation never preempts, delays or
displaces any other work): each draft takes one token of the step's budget
and the row's table grows to hold its KV, from free blocks only.

Verification: a row ``(last token, d_1..d_k)`` at positions ``p..p+k`` is
run in one forward and sampled at each of its ``k + 1`` positions; the
sample at position ``p + j`` uses output position ``output_pos + j``, i.e.
exactly the random number it would have had without speculation (the
``(seed, sample, position)`` rule of :mod:`fnllm.device.sampling`).
:func:`num_accepted`: draft ``d_j`` is accepted when it equals the token
sampled at the position before it, and the longest accepted prefix
``d_1..d_a`` plus the token sampled after it are committed. Every committed
token is therefore a token sampled from the logits of its true prefix with
its own random number: greedy output, and seeded (or executor-seeded)
sampled output, are token for token those of a run without speculation (up
to the float rounding of a multi-token forward on a real device).

Rollback (in :mod:`fnllm.step`): the row's counter becomes ``p + 1 + a``;
blocks allocated only for rejected drafts are freed; the rejected drafts'
KV slots in kept blocks are simply rewritten by later steps. Only blocks
whose every slot holds committed tokens enter the prefix cache.
"""

from __future__ import annotations

from array import array
from typing import Sequence

from fnllm.config import SpeculativeConfig
from fnllm.lifecycle import blocks_for
from fnllm.state import BatchPlan, SamplingParams, cons_tuple

def can_speculate(sp: SamplingParams) -> bool:
    """Whether a request's rows may carry drafts: not when its logits depend
    on the tokens before each position (penalties and bad words: the plan's
    ``history``; a grammar's state), which the plan carries per row, not per
    position."""
    return sp.guided_decoding is None and not sp.bad_words and not sp.needs_history


def propose(tokens: Sequence[int], k: int, n_max: int, n_min: int) -> tuple[int, ...]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of
    the last ``n`` tokens of ``tokens`` (longest ``n`` in ``[n_min, n_max]``
    first); ``()`` when no suffix recurs."""
    total = len(tokens)
    if k <= 0 or total < n_min + 1:
        return ()
    data = array("i", tokens).tobytes()
    w = array("i").itemsize
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        pattern = data[(total - n) * w :]
        end = (total - 1) * w  # an occurrence must start before the suffix itself
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % w == 0:
                start = at // w + n
                return tuple(tokens[start : start + k])
            end = at + len(pattern) - 1  # misaligned byte match: look further left
    return ()


def num_accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """Length of the longest prefix of ``drafts`` equal to ``sampled`` (the
    token sampled at each draft's position-before)."""
    a = 0
    for d, s in zip(drafts, sampled):
        if d != s:
            break
        a += 1
    return a


def draft_counts(plan: BatchPlan) -> tuple[int, ...]:
    """Draft tokens per plan row (all zero for a plan without speculation)."""
    return plan.num_draft_tokens or (0,) * len(plan)


def expected_samples(plan: BatchPlan) -> tuple[int, ...]:
    """Tokens the device returns per row: ``num_samples``, plus one per draft."""
    if not plan.num_draft_tokens:
        return plan.num_samples
    return tuple(n + d for n, d in zip(plan.num_samples, plan.num_draft_tokens))


def spec_stats(state) -> dict:
    """Speculative decoding so far, from an ``EngineState``'s counters:
    drafts (rows that carried drafts), draft and accepted tokens, the
    acceptance rate (accepted / draft tokens; None before any draft) and the
    mean acceptance length (tokens committed per drafted row: 1 + accepted / drafts)."""
    drafts, toks, acc = state.spec_num_drafts, state.spec_num_draft_tokens, state.spec_num_accepted_tokens
    return {
        "num_drafts": drafts,
        "num_draft_tokens": toks,
        "num_accepted_tokens": acc,
        "acceptance_rate": acc / toks if toks else None,
        "mean_acceptance_length": 1 + acc / drafts if drafts else None,
    }


def plan_drafts(step, spec: SpeculativeConfig) -> dict[int, int]:
    """Give the planned decode rows of a scheduling step (``fnllm.schedule._Step``)
    their drafts, within the budget and free blocks it has left; row -> draft count."""
    c, rows, edit, bs = step.cols, step.rows, step.edit, step.bs
    out: dict[int, int] = {}
    if spec.disable_by_batch_size is not None and len(rows) >= spec.disable_by_batch_size:
        return out
    for i in sorted(rows):
        if step.budget <= 0:
            break
        tokens, pos, samples, copies = rows[i]
        nout, sp = c["num_output"][i], c["sampling"][i]
        if samples != 1 or not nout or not can_speculate(sp):
            continue
        nc, table = pos + len(tokens), c["tables"][i]
        room = (len(table) + edit.num_free) * bs - nc
        k = min(spec.num_speculative_tokens, sp.max_tokens - nout - 1, step.budget, room)
        if k <= 0:
            continue
        req = step.requests[c["request_ids"][i]]
        history = req.prompt_token_ids + cons_tuple(c["outputs"][i], nout)
        drafts = propose(history, k, spec.prompt_lookup_max, spec.prompt_lookup_min)
        if not drafts:
            continue
        d = len(drafts)
        extra = blocks_for(nc + d, bs) - len(table)
        if extra > 0:
            c["tables"][i] = table + tuple(edit.allocate(extra))
        c["num_computed"][i] = nc + d
        step.budget -= d
        rows[i] = (tokens + drafts, pos, samples, copies)
        out[i] = d
    return out
