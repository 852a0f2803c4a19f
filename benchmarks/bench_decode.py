"""Decode throughput of the executor alone on the demo model (SmolLM2-135M).

For each dtype and batch size, every sequence already has 100-300 tokens of
context in the KV cache (random K/V: decode cost does not depend on the
values) and the executor runs greedy decode steps. The yardstick, in the same
run: transformers' LlamaForCausalLM forward with its KV cache (a
DynamicCache filled the same way, left-padded), same batch, same dtype, plus
argmax. Each is timed in alternating rounds and the best round counts (on a
shared machine, other load only ever slows a round down: with 2 cores, an
OpenMP barrier that waits for a descheduled thread can cost a whole time
slice). Then one instrumented pass splits a step's time into linears,
attention math, KV gather/scatter, norms/rope/activation, sampling,
plan-to-tensor and the rest (Python, embedding, glue), by timing wrappers.

Usage: python benchmarks/bench_decode.py [--batches 1 16 64] [--dtypes bfloat16 float32] [--steps N]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import fnllm.device.executor as executor_mod
from fnllm.device.executor import ModelExecutor
from fnllm.model.fetch import default_model_path
from fnllm.state import BatchPlan, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
BLOCK = 16


def make_contexts(batch: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(100, 300) for _ in range(batch)]


def decode_plan(ctx: list[int], tables, tokens, step: int) -> BatchPlan:
    n = len(ctx)
    return BatchPlan(step=step, seq_ids=tuple(range(n)), request_ids=tuple(f"r{i}" for i in range(n)),
                     token_ids=tuple((t,) for t in tokens), positions=tuple(ctx), block_tables=tables,
                     num_samples=(1,) * n, sample_index=(0,) * n, output_pos=(step,) * n, sampling=(GREEDY,) * n)


def fnllm_decode(ex: ModelExecutor, ctx: list[int], steps: int, warmup: int = 2) -> float:
    """Tokens/s over ``steps`` decode steps (after ``warmup``)."""
    ctx = list(ctx)
    per = -(-(max(ctx) + steps + warmup + 1) // BLOCK)
    tables = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(len(ctx)))
    tokens = [random.Random(i).randrange(49152) for i in range(len(ctx))]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        out = ex.execute(decode_plan(ctx, tables, tokens, step))
        tokens = [s[0] for s in out.sampled]
        ctx = [c + 1 for c in ctx]
    return len(ctx) * steps / (time.perf_counter() - start)


def load_reference(path, dtype) -> LlamaForCausalLM:
    cfg = load_gguf_checkpoint(str(path))["config"]
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "_model_name_or_path")}
    with no_init_weights():
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"], strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


@torch.inference_mode()
def hf_decode(model: LlamaForCausalLM, ctx: list[int], steps: int, warmup: int = 2) -> float:
    cfg, b, longest = model.config, len(ctx), max(ctx)
    cache = DynamicCache(config=cfg)
    shape = (b, cfg.num_key_value_heads, longest, cfg.head_dim)
    dtype = model.dtype
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), layer)
    mask = torch.zeros(b, longest, dtype=torch.long)
    for i, c in enumerate(ctx):
        mask[i, longest - c :] = 1  # left padding
    ids = torch.randint(0, cfg.vocab_size, (b, 1))
    pos = torch.tensor(ctx)[:, None]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        pos = pos + 1
    return b * steps / (time.perf_counter() - start)


# -- where a step's time goes ----------------------------------------------------------


class Timers:
    def __init__(self):
        self.total = defaultdict(float)
        self._saved = []

    def restore(self) -> None:
        for owner, name, had, old in reversed(self._saved):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        self._saved.clear()

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        had = name in vars(owner)
        self._saved.append((owner, name, had, vars(owner).get(name)))

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t

        setattr(owner, name, timed)


def breakdown(ex: ModelExecutor, ctx: list[int], steps: int) -> dict:
    """Share of one decode step per category, in milliseconds per step."""
    timers = Timers()
    be = ex.backend
    timers.wrap(executor_mod, "build_host_batch", "plan_to_tensor")
    timers.wrap(executor_mod, "sample", "sampling")
    for name, label in (("linear", "linears"), ("prepare", "plan_to_tensor"), ("_write_kv", "kv_gather_scatter"),
                        ("_gather", "kv_gather_scatter"), ("attention", "attention_total"),
                        ("rope_qkv", "norms_rope_act"), ("rms_norm", "norms_rope_act"),
                        ("add_rms_norm", "norms_rope_act"), ("silu_mul", "norms_rope_act")):
        if hasattr(be, name):
            timers.wrap(be, name, label)
    try:
        t = time.perf_counter()
        fnllm_decode(ex, ctx, steps, warmup=0)
        wall = time.perf_counter() - t
    finally:
        timers.restore()
    tot = timers.total
    tot["attention_math"] = tot.pop("attention_total", 0.0) - tot["kv_gather_scatter"]
    tot["python_and_other"] = wall - sum(tot.values())
    return {k: round(v / steps * 1e3, 3) for k, v in sorted(tot.items())} | {"step_ms": round(wall / steps * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=0, help="decode steps timed (default: by batch size)")
    ap.add_argument("--no-reference", action="store_true", help="skip the transformers yardstick")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the best counts")
    args = ap.parse_args()
    path = default_model_path()
    results = {"model": path.name, "threads": torch.get_num_threads(), "block_size": BLOCK, "runs": []}
    for dtype in args.dtypes:
        need = sum(-(-(300 + 64) // BLOCK) for _ in range(max(args.batches)))
        ex = ModelExecutor(path, dtype=dtype, device="cpu", num_blocks=need + 8, block_size=BLOCK)
        for cache in ex.kv_caches:
            cache.normal_()  # stands for contexts already computed
        ref = None if args.no_reference else load_reference(path, getattr(torch, dtype))
        for batch in args.batches:
            steps = args.steps or (24 if batch == 1 else 12 if batch == 16 else 8)
            ctx = make_contexts(batch, seed=batch)
            run = {"dtype": dtype, "batch": batch, "steps": steps, "mean_context": sum(ctx) / batch}
            ours, theirs = [], []
            for _ in range(args.rounds):  # alternate, keep the best: other load on the machine only slows
                ours.append(round(fnllm_decode(ex, ctx, steps), 1))
                if ref is not None:
                    theirs.append(round(hf_decode(ref, ctx, steps), 1))
            run["fnllm_tok_s"], run["fnllm_rounds"] = max(ours), ours
            if ref is not None:
                run["transformers_tok_s"], run["transformers_rounds"] = max(theirs), theirs
                run["ratio"] = round(run["fnllm_tok_s"] / run["transformers_tok_s"], 2)
            run["breakdown_ms_per_step"] = breakdown(ex, ctx, max(steps // 2, 4))
            results["runs"].append(run)
            print(json.dumps(run), flush=True, file=__import__("sys").stderr)
        del ex, ref
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
