"""Scheduler overhead: microseconds per ``schedule`` + ``commit`` with no device.

N running decode sequences (N = 64, 256, 1024; block size 16 and 128; a
pool of 100,000 blocks), each fed a synthetic sampled token per step. The
churn variant gives requests 16 output tokens and replaces each finished one
with a new request (``add_request`` is timed too). The steady variant is a
server's usual step: the N rows end one per step (output lengths 1..N, then N
for each newcomer), and each step admits the request that replaced the last
one to end next to N-1 decoding rows. The window variant runs
the decode case with a sliding window of 64 positions (each row releases a
block every 16 steps), next to the plain decode in the same run. Prints
JSON; the target is <= 150 µs per step at 256 sequences (decode, block size 16).
"""

from __future__ import annotations

import gc
import json
import time

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Request, SamplingParams, StepOutput
from fnllm.step import commit

PROMPT = 32


def config(n: int, bs: int, window: int | None = None) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(vocab_size=32000, eos_token_ids=(2,)),
        cache=CacheConfig(block_size=bs, num_blocks=100_000, enable_prefix_caching=True, sliding_window=window),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(8192, n * PROMPT), max_num_seqs=n, max_model_len=8192),
    )


def request(k: int, max_tokens: int) -> Request:
    prompt = tuple((k * 7919 + j) % 31000 + 100 for j in range(PROMPT))
    return Request(request_id=f"r{k}", prompt_token_ids=prompt, sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def fake_output(plan, step: int) -> StepOutput:
    return StepOutput(sampled=tuple(((step + i) % 30000 + 100,) * n for i, n in enumerate(plan.num_samples)))


def measure(n: int, bs: int, steps: int, churn: bool, window: int | None = None, steady: bool = False) -> float:
    cfg = config(n, bs, window)
    max_tokens = 16 if churn else n if steady else 4000
    churn = churn or steady
    state = initial_state(cfg)
    for k in range(n):
        state = add_request(state, request(k, k + 1 if steady else max_tokens), cfg)
    state, plan = schedule(state, cfg)  # prefill everything
    state, _ = commit(state, plan, fake_output(plan, 0), cfg)
    # the requests that churn in, built ahead (constructing them is the caller's cost, not the core's)
    spares = iter([request(k, max_tokens) for k in range(n, n + n * (steps // 16 + 2) + steps)] if churn else ())
    gc.collect()
    gc.freeze()  # the set-up's objects are long-lived, as after an engine's warm-up (vLLM freezes them too)
    spent = 0.0  # only the core's time: the synthetic device output is not counted
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        state, plan = schedule(state, cfg, now=float(s))
        t1 = time.perf_counter()
        out = fake_output(plan, s)
        t2 = time.perf_counter()
        state, outs = commit(state, plan, out, cfg)
        for rid in outs.finished_requests if churn else ():
            state = add_request(state, next(spares), cfg)
        spent += (t1 - t0) + (time.perf_counter() - t2)
    gc.unfreeze()
    return spent / steps * 1e6


def main() -> None:
    out = {"benchmark": "schedule+commit per step, no device, pool 100k blocks", "target_us_at_256": 150, "decode": {}, "churn": {}}
    for bs in (16, 128):
        for n in (64, 256, 1024):
            steps = max(20, 20000 // n)
            out["decode"][f"bs{bs}_n{n}"] = round(min(measure(n, bs, steps, False) for _ in range(3)), 1)
    for n in (64, 256, 1024):
        steps = max(20, 20000 // n)
        out["churn"][f"bs16_n{n}"] = round(min(measure(n, 16, steps, True) for _ in range(3)), 1)
    out["steady"] = {}
    for n in (64, 256, 1024):
        steps = max(20, 20000 // n)
        out["steady"][f"bs16_n{n}"] = round(min(measure(n, 16, steps, False, steady=True) for _ in range(3)), 1)
    out["window64_decode"] = {}
    for n in (256, 1024):
        steps = max(20, 20000 // n)
        out["window64_decode"][f"bs16_n{n}"] = round(min(measure(n, 16, steps, False, 64) for _ in range(3)), 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
