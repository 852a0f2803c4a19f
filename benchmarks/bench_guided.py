"""Structured-output overhead: decode tok/s with and without a JSON schema at batch 16.

The demo model (SmolLM2-135M) through ``LLM.generate``: ``--batch`` chat
prompts asking for a list of people as JSON, seeded sampling, ``ignore_eos``
and ``--tokens`` new tokens each, so both arms run the same number of steps
and rows. The guided arm adds ``GuidedDecodingParams(json=SCHEMA)``; the
schema wants at least 6 nested objects, longer than ``--tokens``, so the
grammar is live on every step of every row. The yardstick is the same
requests without a schema, in the same process; the arms alternate over
``--rounds`` rounds and each arm's best round counts (other load only ever
slows a round down). Also reported: the guided arm's time inside the bitmask
step (matcher sync, mask fill, mask apply) per step, the schema's compile
time, and whether every guided output is a valid prefix of the schema's JSON.

Usage: python benchmarks/bench_guided.py [--batch 16] [--tokens 64] [--rounds 3] [--dtype bfloat16|float32]
Prints one JSON object. Target: overhead_pct <= 10.
"""

from __future__ import annotations

import argparse
import json
import time

import fnllm.device.guided as guided_mod
from fnllm.llm import LLM
from fnllm.state import GuidedDecodingParams, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                },
                "required": ["name", "age", "city", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}


def prompts(llm: LLM, batch: int) -> list[dict]:
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok.apply_chat_template_ids(
        [{"role": "user", "content": f"List six people (group {k}) as JSON with name, age, city and tags."}])}
        for k in range(batch)]


def run(llm: LLM, items: list[dict], params: list[SamplingParams]) -> tuple[float, list]:
    t = time.perf_counter()
    outs = llm.generate(items, params, use_tqdm=False)
    return time.perf_counter() - t, outs


def timed_apply():
    """Wrap GuidedRows.apply to total its time (the whole grammar cost on the device side)."""
    spent = {"s": 0.0, "calls": 0}
    orig = guided_mod.GuidedRows.apply

    def apply(self, *a):
        t = time.perf_counter()
        orig(self, *a)
        spent["s"] += time.perf_counter() - t
        spent["calls"] += 1

    guided_mod.GuidedRows.apply = apply
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, device="cpu", num_kv_blocks=1024, max_model_len=1024, max_num_seqs=max(args.batch, 16))
    items = prompts(llm, args.batch)
    guide = GuidedDecodingParams(json=SCHEMA)
    from fnllm.guided import grammar_compiler

    t = time.perf_counter()
    compiler = grammar_compiler(llm.get_tokenizer(), llm.llm_engine.config.model.vocab_size)
    setup_s = time.perf_counter() - t  # xgrammar import, the vocabulary's TokenizerInfo (once per process)
    t = time.perf_counter()
    compiler.compile(guide)
    compile_s = time.perf_counter() - t

    def params(g):
        return [SamplingParams(temperature=0.7, seed=k, max_tokens=args.tokens, ignore_eos=True, guided_decoding=g)
                for k in range(args.batch)]

    plain_p, guided_p = params(None), params(guide)
    run(llm, items[:2], params(None)[:2])  # warm-up (kernels, caches)
    spent = timed_apply()
    best = {"plain": float("inf"), "guided": float("inf")}
    apply_best = float("inf")
    outs = []
    for _ in range(args.rounds):
        s, _ = run(llm, items, plain_p)
        best["plain"] = min(best["plain"], s)
        before = spent["s"]
        s, outs = run(llm, items, guided_p)
        if s < best["guided"]:
            best["guided"], apply_best = s, spent["s"] - before
    steps = spent["calls"] // max(args.rounds, 1)
    tokens = args.batch * args.tokens
    tps = {k: tokens / v for k, v in best.items()}
    texts = [o.outputs[0].text for o in outs]
    print(json.dumps({
        "benchmark": "structured output overhead (xgrammar JSON schema)",
        "model": "SmolLM2-135M-Instruct (demo GGUF)", "dtype": args.dtype, "batch": args.batch,
        "new_tokens_per_request": args.tokens, "rounds": args.rounds, "sampling": "temperature 0.7, seeded, ignore_eos",
        "plain_tok_s": round(tps["plain"], 1), "guided_tok_s": round(tps["guided"], 1),
        "overhead_pct": round(100 * (1 - tps["guided"] / tps["plain"]), 2), "target_overhead_pct": 10,
        "guided_bitmask_ms_per_step": round(1000 * apply_best / max(steps, 1), 3),
        "guided_bitmask_share_pct": round(100 * apply_best / best["guided"], 2),
        "schema_compile_ms": round(1000 * compile_s, 1),
        "xgrammar_setup_ms": round(1000 * setup_s, 1),
        "outputs_start_as_schema_json": all(x.startswith('{"people"') or x.lstrip().startswith("{") for x in texts),
        "sample_output": texts[0][:160],
    }, indent=1))


if __name__ == "__main__":
    main()
