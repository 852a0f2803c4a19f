"""Soak: many requests with random aborts and injected device faults; prints JSON.

- ``adds``: 10,000 core ``add_request`` calls into one growing waiting queue
  (the target: under 1 s), against the yardstick of re-sorting the queue on
  every add (the previous algorithm), in the same run.
- ``fake``: 10,000 requests through ``LLMEngine`` and the fake device, with
  random aborts, poison requests and transient faults, against the same
  workload with no aborts and no faults. Reports throughput, p50/p99 step
  time, how every request ended, and the leak check (no live request, every
  block free).
- ``real``: the same on the demo model (``--real N`` requests, default 500).

    .venv/bin/python benchmarks/bench_soak.py [--real 500] [--fake 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.lifecycle import add_request, initial_state, waiting_key
from fnllm.state import Request, SamplingParams

VOCAB = 32000


class Faulty:
    """Wraps a device: poison requests fail every plan holding them (after the
    device ran, so KV was written), and a transient fault fails one call."""

    def __init__(self, inner, rng: random.Random, transient_rate: float) -> None:
        self.inner, self.rng, self.rate = inner, rng, transient_rate
        self.poison: set[str] = set()
        self.calls = self.faults = 0

    def execute(self, plan):
        self.calls += 1
        if self.rng.random() < self.rate:
            self.faults += 1
            raise RuntimeError("transient device fault")
        out = self.inner.execute(plan)
        if self.poison.intersection(plan.request_ids):
            self.faults += 1
            raise RuntimeError("poison request")
        return out


def bench_adds(n: int) -> dict:
    config = EngineConfig(
        model=ModelConfig(vocab_size=VOCAB),
        cache=CacheConfig(block_size=16, num_blocks=100_000),
        scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=4096),
    )
    reqs = [Request(request_id=f"r{k}", prompt_token_ids=tuple((k * 31 + j) % VOCAB for j in range(32)),
                    sampling=SamplingParams(max_tokens=16)) for k in range(n)]
    state = initial_state(config)
    t0 = time.perf_counter()
    firsts = []
    for k, r in enumerate(reqs):
        t = time.perf_counter()
        state = add_request(state, r, config)
        if k < 1000 or k >= n - 1000:
            firsts.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    # yardstick: the previous algorithm, re-sorting the whole queue on every add
    waiting, t0 = [], time.perf_counter()
    for s in state.waiting:
        waiting = sorted(waiting + [s], key=lambda x: waiting_key(state.requests[x.request_id], x, "fcfs"))
    resort = time.perf_counter() - t0
    return {
        "requests": n, "core_add_s": round(total, 3), "target_s": 1.0, "met": total < 1.0,
        "first_1000_us_per_add": round(1e6 * sum(firsts[:1000]) / 1000, 1),
        "last_1000_us_per_add": round(1e6 * sum(firsts[-1000:]) / 1000, 1),
        "yardstick_resort_insert_s": round(resort, 3),
    }


def workload(n: int, vocab: int, max_tokens: int, seed: int) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    return [(f"q{k}", [rng.randrange(1, vocab) for _ in range(rng.randint(4, 48))], rng.randint(1, max_tokens))
            for k in range(n)]


def soak(engine: LLMEngine, dev: Faulty | None, work, rng: random.Random, *, abort_p: float, poison_p: float,
         arrivals_per_step: int = 8) -> dict:
    """Feed ``work`` at ``arrivals_per_step`` requests a step; abort and poison at random."""
    added, ended, steps, tokens, k = [], {}, [], 0, 0
    t0 = time.perf_counter()
    while k < len(work) or engine.has_unfinished_requests():
        for rid, prompt, max_tokens in work[k : k + arrivals_per_step]:
            engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            added.append(rid)
            if dev is not None and rng.random() < poison_p:
                dev.poison.add(rid)
        k += arrivals_per_step
        if added and rng.random() < abort_p:
            engine.abort_request(rng.choice(added))
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                assert out.request_id not in ended, f"{out.request_id} ended twice"
                ended[out.request_id] = out.outputs[0].finish_reason
                tokens += len(out.outputs[0].token_ids)
        steps.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    pool = engine.state.pool
    steps.sort()
    reasons: dict[str, int] = {}
    for why in ended.values():
        reasons[why] = reasons.get(why, 0) + 1
    return {
        "requests": len(work), "wall_s": round(wall, 2), "requests_per_s": round(len(work) / wall, 1),
        "tokens_per_s": round(tokens / wall, 1), "steps": len(steps),
        "step_p50_ms": round(1e3 * steps[len(steps) // 2], 3), "step_p99_ms": round(1e3 * steps[int(len(steps) * 0.99)], 3),
        "ended": reasons, "every_request_ended_once": set(ended) == set(added),
        "leak_free": not engine.state.requests and pool.num_free == pool.num_blocks,
        "device_faults": None if dev is None else dev.faults,
    }


def run_pair(make, work, seed: int) -> dict:
    """The workload with aborts and faults, and without (the yardstick), same requests."""
    out = {}
    for faults in (True, False):
        rng = random.Random(seed + 1)
        engine, dev = make(rng, faults)
        kw = dict(abort_p=0.05, poison_p=0.01) if faults else dict(abort_p=0.0, poison_p=0.0)
        out["with_faults" if faults else "yardstick_no_faults"] = soak(engine, dev, work, rng, **kw)
    a, b = out["with_faults"], out["yardstick_no_faults"]
    out["step_p99_ratio"] = round(a["step_p99_ms"] / b["step_p99_ms"], 2)
    return out


def fake_engine(rng, faults: bool) -> tuple[LLMEngine, Faulty | None]:
    config = EngineConfig(
        model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
        cache=CacheConfig(block_size=16, num_blocks=2048),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=256),
    )
    inner = FakeExecutor(2048, 16, 97)
    dev = Faulty(inner, rng, 0.01) if faults else None
    return LLMEngine(config, dev or inner, max_consecutive_failures=5), dev


def real_engine(rng, faults: bool, llm) -> tuple[LLMEngine, Faulty | None]:
    base = llm.llm_engine
    dev = Faulty(base.executor, rng, 0.01) if faults else None
    return LLMEngine(base.config, dev or base.executor, llm.get_tokenizer(), max_consecutive_failures=5), dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake", type=int, default=10_000)
    ap.add_argument("--real", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = {"adds": bench_adds(10_000)}
    out["fake"] = run_pair(lambda rng, f: fake_engine(rng, f), workload(args.fake, 97, 16, args.seed), args.seed)
    if args.real:
        from fnllm.llm import LLM

        llm = LLM(dtype="bfloat16", device="cpu", num_kv_blocks=4096, max_model_len=512)
        work = workload(args.real, llm.llm_engine.config.model.vocab_size, 16, args.seed)
        out["real"] = run_pair(lambda rng, f: real_engine(rng, f, llm), work, args.seed)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
