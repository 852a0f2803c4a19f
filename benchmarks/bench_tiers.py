"""Tiered KV: recompute against swap preemption on a cramped pool, and the
disk tier's time to first token for a long shared system prompt.

The demo model (SmolLM2-135M) serves the same workload (``--num-prompts``
prompts of ``--prompt-len`` tokens, ``--max-tokens`` greedy tokens each)
three times over one loaded executor: with a roomy pool (the yardstick, no
preemption), and with a pool of ``--pool-fraction`` of the blocks the
workload wants, under ``preemption_mode="recompute"`` and ``"swap"``. Prints
JSON: generated tokens/s for each, the swap / recompute throughput ratio,
preemptions, blocks moved, and whether all three gave the same tokens.

Disk tier: a fresh process (``--system-len`` tokens of system prompt, a
short question) measures the time from ``add_request`` to the first token,
twice in sequence with the same ``kv_offload_dir``: the first computes the
prompt (and writes its blocks), the second reads them from disk. Model
loading is not counted; the disk read is (it happens in ``add_request``).
Prints the ratio recompute / disk (target >= 5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from fnllm.config import CacheConfig, EngineConfig, SchedulerConfig
from fnllm.device.kv_tiers import HostKV
from fnllm.engine import LLMEngine
from fnllm.llm import LLM
from fnllm.state import SamplingParams


def workload(llm: LLM, n: int, length: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    base = tok.encode("A long time ago in a galaxy far, far away, there lived a curious engineer who " * 40)
    return [[(t + 7 * k) % 40000 + 200 for t in base[:length]] for k in range(n)]


def run(llm: LLM, prompts, *, num_blocks: int, mode: str, host_blocks: int, max_tokens: int, budget: int) -> dict:
    base = llm.llm_engine.config
    config = EngineConfig(
        model=base.model,
        cache=CacheConfig(block_size=base.cache.block_size, num_blocks=num_blocks, enable_prefix_caching=False,
                          num_host_blocks=host_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=len(prompts),
                                  max_model_len=base.scheduler.max_model_len, preemption_mode=mode),
    )
    eng = LLMEngine(config, llm.llm_engine.executor, llm.get_tokenizer())
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for k, p in enumerate(prompts):
        eng.add_request(f"q{k}", {"prompt_token_ids": p}, sp)
    done, moved, t0 = {}, 0, time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        plan = eng.last_plan
        moved += len(plan.swap_out) + len(plan.swap_in)
    secs = time.perf_counter() - t0
    n_tokens = sum(len(t) for t in done.values())
    return {
        "seconds": round(secs, 2), "tokens_per_s": round(n_tokens / secs, 1),
        "preemptions": eng.state.num_preemptions, "blocks_moved": moved,
        "tokens": [done[f"q{k}"] for k in range(len(prompts))],
    }


def ttft_child(args) -> None:
    """One fresh process: TTFT of a long system prompt with the disk tier at ``args.ttft_child``."""
    llm = LLM(args.model, dtype=args.dtype, device="cpu", block_size=args.block_size, max_model_len=4096,
              kv_offload_dir=args.ttft_child, swap_space=1)
    tok = llm.get_tokenizer()
    system = tok.encode("You are a meticulous assistant for a railway company. " * 400)[: args.system_len]
    prompt = system + tok.encode(" Question: when does the first train leave?")
    eng = llm.llm_engine
    t0 = time.perf_counter()
    eng.add_request("q", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    first = None
    while first is None:
        for out in eng.step():
            if out.outputs and out.outputs[0].token_ids:
                first = out
    ttft = time.perf_counter() - t0
    eng.kv_offload.disk.flush()
    print(json.dumps({"ttft_s": round(ttft, 4), "num_cached_tokens": first.num_cached_tokens,
                      "prompt_tokens": len(prompt), "token": first.outputs[0].token_ids}))


def disk_ttft(args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, os.path.abspath(__file__), "--ttft-child", d, "--dtype", args.dtype,
               "--block-size", str(args.block_size), "--system-len", str(args.system_len)]
        if args.model:
            cmd += ["--model", args.model]
        runs = []
        for _ in range(2):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    return {"system_prompt_tokens": args.system_len, "recompute": cold, "from_disk": warm,
            "ttft_ratio_recompute_over_disk": round(cold["ttft_s"] / warm["ttft_s"], 2), "target": 5,
            "same_first_token": cold["token"] == warm["token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--pool-fraction", type=float, default=0.4)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--ttft-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-swap", action="store_true", help="only the disk-tier TTFT")
    ap.add_argument("--skip-disk", action="store_true", help="only recompute vs swap")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each preemption mode, alternating; the fastest counts")
    args = ap.parse_args()
    if args.ttft_child:
        return ttft_child(args)
    disk = None if args.skip_disk else disk_ttft(args)
    if args.skip_swap:
        print(json.dumps({"disk_tier_ttft": disk}, indent=2))
        return
    bs = args.block_size
    want = args.num_prompts * -(-(args.prompt_len + args.max_tokens) // bs)
    llm = LLM(args.model, dtype=args.dtype, device="cpu", block_size=bs, num_kv_blocks=want + 8, max_model_len=2048)
    ex = llm.llm_engine.executor
    ex.host_kv = HostKV(want, ex.kv_caches)
    prompts = workload(llm, args.num_prompts, args.prompt_len)
    cramped = max(int(want * args.pool_fraction), -(-(args.prompt_len + args.max_tokens) // bs))
    common = dict(max_tokens=args.max_tokens, budget=2048)
    run(llm, prompts[:2], num_blocks=want, mode="recompute", host_blocks=0, **common)  # warm-up
    roomy = run(llm, prompts, num_blocks=want, mode="recompute", host_blocks=0, **common)
    recompute = swap = None
    for _ in range(args.repeat):  # alternate, keep each mode's fastest run
        r = run(llm, prompts, num_blocks=cramped, mode="recompute", host_blocks=0, **common)
        w = run(llm, prompts, num_blocks=cramped, mode="swap", host_blocks=want, **common)
        recompute = r if recompute is None or r["seconds"] < recompute["seconds"] else recompute
        swap = w if swap is None or w["seconds"] < swap["seconds"] else swap
    same = {"recompute_vs_roomy": recompute["tokens"] == roomy["tokens"], "swap_vs_roomy": swap["tokens"] == roomy["tokens"],
            "swap_vs_recompute": swap["tokens"] == recompute["tokens"]}  # bf16 greedy may differ with batch shape
    for r in (roomy, recompute, swap):
        del r["tokens"]
    print(json.dumps({
        "benchmark": "recompute vs swap preemption on a cramped pool (demo model, CPU)",
        "workload": {"prompts": args.num_prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                     "block_size": bs, "blocks_wanted": want, "cramped_pool_blocks": cramped, "dtype": args.dtype},
        "roomy": roomy, "recompute": recompute, "swap": swap,
        "swap_over_recompute_throughput": round(swap["tokens_per_s"] / recompute["tokens_per_s"], 3),
        "same_tokens": same,
        "disk_tier_ttft": disk,
    }, indent=2))


if __name__ == "__main__":
    main()
