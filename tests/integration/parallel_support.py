"""Helpers for the tensor/pipeline-parallel tests: a fixed set of plans that
exercise prefill, a chunk over cached context, block copies, mixed and pure
decode steps; an engine around any executor; pids that must be gone."""

from __future__ import annotations

import os
import time

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.engine import LLMEngine
from fnllm.state import SamplingParams
from integration_support import Driver, Seq, make_plan, tokens

NUM_BLOCKS, BLOCK = 48, 16


def plan_sequence():
    """Plans over 3 sequences: prompt chunks, a copy-on-write copy, mixed and pure decode steps."""
    drv = Driver(NUM_BLOCKS, BLOCK, seed=3)
    a, b, c = Seq(tokens(60, 31)), Seq(tokens(60, 32)), Seq(tokens(60, 33))
    rows = [
        [drv.row(a, 23), drv.row(b, 9, num_samples=0)],
        [drv.row(a, 1), drv.row(b, 20), drv.row(c, 5, num_samples=0)],  # b: a chunk over cached context
        [drv.row(c, 17), drv.row(a, 1), drv.row(b, 1)],
    ] + [[drv.row(a, 1), drv.row(b, 1), drv.row(c, 1)] for _ in range(3)]
    plans = [make_plan(r, step=i) for i, r in enumerate(rows)]
    # a block copy (as copy-on-write does): c's first block into a free one, then read through it
    free = drv.free.pop()
    c.table[0], copy = free, (c.table[0], free)
    plans.append(make_plan([drv.row(c, 1), drv.row(a, 1)], copies=(copy,), step=len(plans)))
    return plans


def engine_for(executor, *, num_blocks=NUM_BLOCKS, budget=64, max_num_seqs=8) -> LLMEngine:
    """An engine (no tokenizer) around ``executor``: chunked prefill with a small token budget."""
    config = EngineConfig(
        model=ModelConfig(vocab_size=executor.vocab_size, eos_token_ids=()),
        cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=256),
    )
    return LLMEngine(config, executor)


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 8) -> dict[str, list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """The pids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        time.sleep(0.1)
    return alive
