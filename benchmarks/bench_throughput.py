"""Offline throughput: fnllm ``LLM.generate`` vs transformers ``generate``.

The workload: 64 prompts of random token ids, prompt lengths uniform in
16..256, output lengths uniform in 32..128, greedy, ``ignore_eos``, seed 0.
transformers runs static batches (default: one batch of 64, left padding)
to the longest requested output; only the tokens each request asked for
count as useful. Same weights (the demo SmolLM2 GGUF dequantized into dense
tensors; ``--reference gguf``: transformers' own GGUF path, which keeps them
packed and computes in float32) and dtype, in one process. Prints JSON with
both throughputs and the ratio, and (unless ``--no-profile``) where fnllm's
step time goes: executor forward, sampling, host batch building, schedule,
commit, engine shell (``StepProfiler``: wrappers installed by this script;
the engine and the core are not touched), overall, for the pure decode
steps at full batch and for the prefill/mixed steps. ``scheduler_share_pct``
is schedule + commit over step time. ``--batch-invariant`` also runs the
same workload with ``LLM(batch_invariant=True)`` in the same process and
reports its throughput and cost against the default kernels (target <= 15 %).

    python benchmarks/bench_throughput.py [--dtype bfloat16|float32] [--num-prompts 64] [--skip-transformers]
        [--reference dense|gguf] [--trace FILE] [--no-profile]
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


def run_fnllm(path, dtype, prompts, outs, args, batch_invariant: bool = False) -> dict:
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(path), dtype=dtype, device="cpu", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_memory, trace=args.trace,
              batch_invariant=batch_invariant)
    load = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in outs]
    prof = StepProfiler(llm) if args.profile else None
    t0 = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    got = sum(len(r.outputs[0].token_ids) for r in res)
    assert got == sum(outs), (got, sum(outs))
    out = {"tokens_per_s": round(got / wall, 1), "wall_s": round(wall, 2), "load_s": round(load, 2)}
    if prof is not None:
        prof.restore()
        out["profile"] = prof.report(wall, args.max_num_seqs)
    llm.shutdown()
    return out


class StepProfiler:
    """Times the parts of every engine step by wrapping functions from the
    outside (the engine and the core are not touched): ``schedule`` and
    ``commit`` (as ``fnllm.engine`` calls them), the executor's ``execute``,
    ``forward``, ``build_host_batch``, ``sample`` and ``copy_blocks``, and
    ``LLMEngine.step`` itself. The engine shell is ``LLMEngine.step`` minus
    schedule, execute and commit (output absorption, detokenization, trace
    recording); the executor's rest is ``execute`` minus its timed parts
    (building sample requests, packing the step output)."""

    PARTS = ("schedule", "commit", "execute", "forward", "host_batch", "sample", "copy_blocks", "engine_step")

    def __init__(self, llm):
        import fnllm.device.executor as exmod
        import fnllm.engine as engmod

        self.steps: list[dict] = []
        self.cur: dict = {}
        self._undo = []
        ex = llm.llm_engine.executor
        engine = llm.llm_engine
        self._wrap(engmod, "schedule", "schedule", plan_result=True)
        self._wrap(engmod, "commit", "commit")
        self._wrap(exmod, "build_host_batch", "host_batch")
        self._wrap(exmod, "sample", "sample")
        self._wrap(ex, "execute", "execute")
        self._wrap(ex, "forward", "forward")
        self._wrap(ex, "copy_blocks", "copy_blocks")
        self._wrap(engine, "step", "engine_step", closes_step=True)

    def _wrap(self, owner, name, key, plan_result=False, closes_step=False):
        fn = getattr(owner, name)
        had = name in vars(owner)
        cur = self

        def wrapper(*a, **kw):
            t = time.perf_counter()
            r = fn(*a, **kw)
            cur.cur[key] = cur.cur.get(key, 0.0) + time.perf_counter() - t
            if plan_result:
                plan = r[1]
                cur.cur["rows"] = len(plan)
                cur.cur["tokens"] = sum(map(len, plan.token_ids))
            if closes_step:
                cur.steps.append(cur.cur)
                cur.cur = {}
            return r

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, fn, had))

    def restore(self):
        for owner, name, fn, had in reversed(self._undo):
            if had:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)

    @staticmethod
    def _summary(steps: list[dict]) -> dict:
        tot = {k: sum(s.get(k, 0.0) for s in steps) for k in StepProfiler.PARTS}
        step = tot["engine_step"] or 1e-12
        timed_ex = tot["forward"] + tot["host_batch"] + tot["sample"] + tot["copy_blocks"]
        parts = {
            "executor_forward": tot["forward"],
            "sampling": tot["sample"],
            "host_batch_building": tot["host_batch"],
            "copy_blocks": tot["copy_blocks"],
            "executor_rest": tot["execute"] - timed_ex,
            "schedule": tot["schedule"],
            "commit": tot["commit"],
            "engine_shell": tot["engine_step"] - tot["schedule"] - tot["commit"] - tot["execute"],
        }
        n = max(len(steps), 1)
        return {
            "steps": len(steps),
            "tokens": sum(s.get("tokens", 0) for s in steps),
            "step_ms_mean": round(step / n * 1e3, 3),
            "ms_per_step": {k: round(v / n * 1e3, 3) for k, v in parts.items()},
            "share_pct": {k: round(100 * v / step, 2) for k, v in parts.items()},
            "scheduler_share_pct": round(100 * (tot["schedule"] + tot["commit"]) / step, 3),
        }

    def report(self, wall: float, batch: int) -> dict:
        steps = self.steps
        full = [s for s in steps if s.get("rows") == batch and s.get("tokens") == batch]
        return {
            "method": "timing wrappers around schedule, commit, execute, forward, build_host_batch, sample, "
                      "copy_blocks and LLMEngine.step, installed by the benchmark (see StepProfiler)",
            "wall_in_engine_step_pct": round(100 * sum(s.get("engine_step", 0) for s in steps) / wall, 2),
            "all_steps": self._summary(steps),
            f"pure_decode_steps_at_batch_{batch}": self._summary(full),
            "prefill_or_mixed_steps": self._summary([s for s in steps if s.get("tokens", 0) > s.get("rows", 0)]),
        }


def load_transformers(path, dtype: str, reference: str):
    """``dense``: LlamaForCausalLM with the GGUF dequantized into plain ``dtype``
    tensors (the weights fnllm runs); ``gguf``: ``from_pretrained(gguf_file=)``,
    which in transformers 5.x keeps the weights packed (Q4_1) and computes in
    float32 whatever ``dtype`` says."""
    if reference == "dense":
        from bench_decode import load_reference

        return load_reference(path, getattr(torch, dtype))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()


def run_transformers(path, dtype, prompts, outs, batch: int, reference: str = "dense") -> dict:
    model = load_transformers(path, dtype, reference)
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
    return {"tokens_per_s": round(sum(outs) / wall, 1), "wall_s": round(wall, 2), "static_batch": batch,
            "weights": reference}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="transformers' static batch size")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-memory", type=int, default=1 << 30)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--reference", default="dense", choices=("dense", "gguf"),
                    help="transformers' weights: dense dequantized tensors in --dtype (default) or GGUF-packed")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="do not time the parts of each step (schedule, commit, forward, sampling, ...)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="also run LLM(batch_invariant=True) on the same workload and report its cost")
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
    if args.batch_invariant:
        inv = result["fnllm_batch_invariant"] = run_fnllm(path, args.dtype, prompts, outs, args, batch_invariant=True)
        result["batch_invariant_cost_pct"] = round(
            100 * (1 - inv["tokens_per_s"] / result["fnllm"]["tokens_per_s"]), 1)
    if not args.skip_transformers:
        result["transformers"] = run_transformers(path, args.dtype, prompts, outs, args.batch, args.reference)
        result["ratio"] = round(result["fnllm"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 2)
        if args.batch_invariant:
            result["ratio_batch_invariant"] = round(
                result["fnllm_batch_invariant"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
