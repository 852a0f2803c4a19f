"""Offline throughput: fnllm ``LLM.generate`` vs transformers ``generate``.

The workload: 64 prompts of random token ids, prompt lengths uniform in
16..256, output lengths uniform in 32..128, greedy, ``ignore_eos``, seed 0.
transformers runs static batches (default: one batch of 64, left padding)
to the longest requested output; only the tokens each request asked for
count as useful. Same weights (the demo SmolLM2 GGUF, dequantized) and
dtype, in one process. Prints JSON with both throughputs and the ratio.

    python benchmarks/bench_throughput.py [--dtype bfloat16|float32] [--num-prompts 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch


def workload(n: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    outputs = [rng.randint(32, 128) for _ in range(n)]
    return prompts, outputs


def run_fnllm(path, dtype, prompts, outs, args) -> dict:
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(path), dtype=dtype, device="cpu", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_memory, trace=args.trace)
    load = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in outs]
    t0 = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    got = sum(len(r.outputs[0].token_ids) for r in res)
    assert got == sum(outs), (got, sum(outs))
    return {"tokens_per_s": round(got / wall, 1), "wall_s": round(wall, 2), "load_s": round(load, 2)}


def run_transformers(path, dtype, prompts, outs, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(prompts), batch):
            ps, ms = prompts[k : k + batch], outs[k : k + batch]
            width = max(map(len, ps))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
            model.generate(ids, attention_mask=mask, max_new_tokens=max(ms), min_new_tokens=max(ms),
                           do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(sum(outs) / wall, 1), "wall_s": round(wall, 2), "static_batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="transformers' static batch size")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-memory", type=int, default=1 << 30)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--trace", default=None, help="record a replay trace while measuring (its overhead shows in fnllm's figure)")
    args = ap.parse_args()
    from fnllm.model.fetch import default_model_path

    path = default_model_path()
    prompts, outs = workload(args.num_prompts, 49152)
    result = {
        "benchmark": "offline throughput (useful generated tokens/s)",
        "model": path.name, "dtype": args.dtype, "num_prompts": args.num_prompts,
        "useful_tokens": sum(outs), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "fnllm": run_fnllm(path, args.dtype, prompts, outs, args),
        "recording_trace": args.trace is not None,
    }
    if not args.skip_transformers:
        result["transformers"] = run_transformers(path, args.dtype, prompts, outs, args.batch)
        result["ratio"] = round(result["fnllm"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
