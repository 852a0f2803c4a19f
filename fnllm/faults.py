"""What a failed device step leaves behind, as pure functions.

When ``executor.execute(plan)`` raises (or is interrupted), the engine keeps
the state the plan was scheduled from, but the device may already have
written some of the plan's KV slots. Those writes land in blocks the plan
allocated, and in the old state such a block can still hold another
sequence's computed KV (the plan preempted it and reused its blocks) or a
cached prefix (the plan evicted it). :func:`repair_after_failure` makes the
old state true again:

- every running sequence whose *computed* slots the plan may have written is
  preempted by recompute (its blocks freed, its output kept);
- every block the plan may have written (device blocks by its rows,
  copies and swap-ins; host blocks by its swap-outs) is dropped from the
  prefix cache of its tier.

Probing a failed plan is done with :func:`plan_subset`: a sub-plan writes a
subset of the slots the whole plan writes, so one repair covers every probe.
A plan is safe to run again (:func:`rerunnable`) unless it swaps blocks out:
a swapped-out device block may be refilled later in the same plan, and a
second run would then copy the new content to the host.
"""

from __future__ import annotations

import attrs

from fnllm.blocks import PoolEdit
from fnllm.config import EngineConfig
from fnllm.lifecycle import remove_rows, insert_waiting
from fnllm.state import BatchPlan, EngineState, Seq, SeqStatus


def plan_subset(plan: BatchPlan, rows: list[int]) -> BatchPlan:
    """The rows ``rows`` of ``plan`` (every copy kept: copies only write blocks
    the plan allocated, and are idempotent)."""

    def pick(col: tuple) -> tuple:
        return tuple(col[i] for i in rows)

    return attrs.evolve(
        plan,
        seq_ids=pick(plan.seq_ids),
        request_ids=pick(plan.request_ids),
        token_ids=pick(plan.token_ids),
        positions=pick(plan.positions),
        block_tables=pick(plan.block_tables),
        num_samples=pick(plan.num_samples),
        sample_index=pick(plan.sample_index),
        output_pos=pick(plan.output_pos),
        sampling=pick(plan.sampling),
        num_draft_tokens=pick(plan.num_draft_tokens) if plan.num_draft_tokens else (),
        guided_outputs=pick(plan.guided_outputs) if plan.guided_outputs else (),
        history=pick(plan.history) if plan.history else (),
        prompt_targets=pick(plan.prompt_targets) if plan.prompt_targets else (),
    )


def rerunnable(plan: BatchPlan) -> bool:
    """Whether running ``plan`` again after a partial run gives the same result."""
    return not plan.swap_out


def written_offsets(plan: BatchPlan, block_size: int) -> dict[int, int]:
    """Device block -> the lowest slot offset ``plan`` may write in it (copy
    and swap-in destinations are written whole)."""
    low: dict[int, int] = {}
    for pos, toks, table in zip(plan.positions, plan.token_ids, plan.block_tables):
        if not toks:
            continue
        first, last = pos // block_size, (pos + len(toks) - 1) // block_size
        for j in range(first, last + 1):
            off = pos % block_size if j == first else 0
            b = table[j]
            low[b] = min(low.get(b, off), off)
    for _, dst in plan.copies + plan.swap_in:
        low[dst] = 0
    return low


def _clobbered_rows(state: EngineState, low: dict[int, int], bs: int) -> list[int]:
    """Running rows that hold a written block at a slot they had computed."""
    run, rows = state.running, []
    for i, (nc, table) in enumerate(zip(run.num_computed, run.tables)):
        for j, b in enumerate(table):
            off = low.get(b)
            if off is not None and off < min(bs, nc - j * bs):
                rows.append(i)
                break
    return rows


def repair_after_failure(state: EngineState, plan: BatchPlan, config: EngineConfig) -> EngineState:
    """``state`` (the one ``plan`` was scheduled from) with every trace of the
    plan's possible KV writes made harmless; see the module docstring."""
    bs = config.cache.block_size
    low = written_offsets(plan, bs)
    if not low and not plan.swap_out:
        return state
    victims = set(_clobbered_rows(state, low, bs))
    run, edit = state.running, PoolEdit(state.pool)
    preempted = [
        Seq(
            seq_id=run.seq_ids[i], request_id=run.request_ids[i], index=run.indexes[i],
            status=SeqStatus.PREEMPTED, output=run.outputs[i], num_output=run.num_output[i], hashes=run.hashes[i],
        )
        for i in sorted(victims)
    ]
    running, tables = remove_rows(state, [i not in victims for i in range(len(run))])
    for table in tables:
        edit.free_table(table)
    for b in sorted(low):
        edit.uncache(b)
    if plan.swap_out:  # host blocks the plan wrote: a host-cached one there can no longer be trusted
        for h in sorted({h for _, h in plan.swap_out}):
            edit.host.uncache(h)
    waiting = insert_waiting(state.requests, state.waiting, preempted, config.scheduler.policy)
    return attrs.evolve(state, pool=edit.finish(), running=running, waiting=waiting)
