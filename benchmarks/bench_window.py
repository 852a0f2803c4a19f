"""Sliding window: KV blocks in use, with and without a window, in the same run.

Four requests of 1000 prompt + 1000 output tokens (block size 16, a pool of
400 blocks, the deterministic fake device, so only the pure core is
measured): without a window every sequence holds all its blocks and the
pool overflows (preemption); with a 256-position window each holds about
W / block_size + 2 blocks, the rest released as holes. Prints JSON: peak
blocks in use, steps, preemptions, and the core's time per step.
"""

from __future__ import annotations

import json
import time

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Request, SamplingParams
from fnllm.step import commit

BLOCKS, BS, LEN = 400, 16, 1000


def run(window: int | None) -> dict:
    cfg = EngineConfig(
        model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
        cache=CacheConfig(block_size=BS, num_blocks=BLOCKS, sliding_window=window),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8, max_model_len=4096),
    )
    state = initial_state(cfg)
    for k in range(4):
        prompt = tuple((j * 7 + k) % 96 + 1 for j in range(LEN))
        sp = SamplingParams(max_tokens=LEN, ignore_eos=True, temperature=0.0)
        state = add_request(state, Request(request_id=f"r{k}", prompt_token_ids=prompt, sampling=sp), cfg)
    ex = FakeExecutor(BLOCKS, BS, 97, sliding_window=window)
    peak = steps = 0
    core = 0.0
    while state.requests:
        t0 = time.perf_counter()
        state, plan = schedule(state, cfg)
        t1 = time.perf_counter()
        out = ex.execute(plan)
        t2 = time.perf_counter()
        state, _ = commit(state, plan, out, cfg)
        core += (t1 - t0) + (time.perf_counter() - t2)
        peak = max(peak, state.pool.num_blocks - state.pool.num_free)
        steps += 1
    return {"peak_blocks_in_use": peak, "steps": steps, "preemptions": state.num_preemptions,
            "core_us_per_step": round(core / steps * 1e6, 1)}


def main() -> None:
    out = {"workload": f"4 requests x ({LEN} prompt + {LEN} output), block {BS}, pool {BLOCKS} blocks, fake device",
           "no_window": run(None), "window_256": run(256)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
