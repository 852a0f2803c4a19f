"""N-gram speculative decoding (prompt lookup) on a code-editing workload.

Each request asks the demo model (SmolLM2-135M GGUF, on the CPU) to rewrite
a short Python module with one identifier renamed, so the answer copies long
stretches of its prompt: the case prompt lookup is for. One model is loaded;
the yardstick is an ``LLMEngine`` on the same executor without speculation,
in the same process, its runs interleaved with the speculative ones.

For batch sizes 1 and 16 (``--batches``): greedy decoding of ``--tokens``
tokens per request, run ``--repeats`` times per mode, alternating modes.
Decode tok/s counts the tokens generated after every request of the batch
has its first token, over the time from then to the end (prefill excluded);
the best repeat of each mode is reported (the machine is shared, so the
best is the least disturbed). Every speculative run's token ids are asserted
identical to the plain run's. Reported per batch: decode tok/s with and
without, the speedup, and the acceptance rate (accepted / draft tokens),
the mean acceptance length (tokens committed per drafted row) and the
drafts, from the engine's counters over the speculative runs.

    python benchmarks/bench_spec_decode.py [--tokens 96] [--repeats 2] [--batches 1,16] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import attrs

FUNCS = ["add", "scale", "clamp", "mean", "norm", "area", "total", "ratio"]
TEMPLATE = '''def {f}_{i}(values, factor):
    result = []
    for value in values:
        if value > factor:
            result.append(value * factor)
        else:
            result.append(value + factor)
    return result


def check_{f}_{i}(values, factor):
    for value in values:
        if value < 0:
            raise ValueError("negative value")
    return {f}_{i}(values, factor)
'''


def prompts(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        f = FUNCS[i % len(FUNCS)]
        code = TEMPLATE.format(f=f, i=i)
        out.append([{"role": "user", "content": "Rewrite this Python code with the parameter factor renamed to "
                     f"weight. Output only the code.\n\n{code}"}])
    return out


def run(engine, prompt_ids: list[list[int]], params) -> tuple[list[list[int]], float, int]:
    """Token ids per request, decode seconds, decode tokens (after every first token)."""
    for k, p in enumerate(prompt_ids):
        engine.add_request(f"b{k}", {"prompt_token_ids": p}, params)
    done, started, t_first, n_first = {}, set(), None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids:
                started.add(out.request_id)
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if t_first is None and len(started) == len(prompt_ids):
            t_first = time.perf_counter()
            n_first = _tokens_so_far(engine, done)
    t_end = time.perf_counter()
    ids = [done[f"b{k}"] for k in range(len(prompt_ids))]
    return ids, t_end - t_first, sum(map(len, ids)) - n_first


def _tokens_so_far(engine, done: dict) -> int:
    """Tokens generated so far by every request of the batch (finished or live)."""
    live = sum(len(c.token_ids) for t in engine._tracks.values() for c in t.completions.values())
    return live + sum(len(v) for v in done.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import torch

    from fnllm import LLM, SamplingParams
    from fnllm.engine import LLMEngine

    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(dtype=args.dtype, device="cpu", max_num_seqs=max(batches), speculative_config=spec)
    spec_engine = llm.llm_engine
    tok = llm.get_tokenizer()
    plain_engine = LLMEngine(attrs.evolve(spec_engine.config, speculative=None), spec_engine.executor, tok)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    convs = prompts(max(batches))
    ids = [tok.apply_chat_template_ids(c) for c in convs]
    run(plain_engine, ids[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    run(spec_engine, ids[:1], SamplingParams(temperature=0.0, max_tokens=8))
    results = {}
    for b in batches:
        best = {"plain": 0.0, "spec": 0.0}
        before = spec_engine.spec_decode_stats()
        ref_ids = None
        for _ in range(args.repeats):
            for mode, engine in (("plain", plain_engine), ("spec", spec_engine)):
                got, secs, n = run(engine, ids[:b], params)
                if ref_ids is None:
                    ref_ids = got
                assert got == ref_ids, f"batch {b}: {mode} output differs from the plain run"
                best[mode] = max(best[mode], n / secs)
        after = spec_engine.spec_decode_stats()
        drafts, dtoks, acc = (after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"))
        results[f"batch_{b}"] = {
            "plain_decode_tok_s": round(best["plain"], 2),
            "spec_decode_tok_s": round(best["spec"], 2),
            "speedup": round(best["spec"] / best["plain"], 2),
            "identical_outputs": True,
            "acceptance_rate": round(acc / dtoks, 3) if dtoks else None,
            "mean_acceptance_length": round(1 + acc / drafts, 2) if drafts else None,
            "num_drafts": drafts,
            "num_draft_tokens": dtoks,
            "num_accepted_tokens": acc,
            "generated_tokens_per_request": [len(x) for x in ref_ids][:4],
        }
    llm.shutdown()
    print(json.dumps({
        "benchmark": "spec_decode_ngram",
        "workload": "code editing (rename a parameter in a 16-line Python module), greedy",
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized",
        "dtype": args.dtype,
        "speculative_config": spec,
        "tokens_per_request": args.tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
