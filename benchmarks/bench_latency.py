"""Batch-1 latency: time to first token (TTFT) and time per output token (TPOT).

fnllm goes through ``LLM`` -> ``LLMEngine.step`` (the whole engine: schedule,
execute, commit, detokenization); the yardstick is transformers' ``generate``
with the same weights (the demo SmolLM2 GGUF dequantized into dense tensors;
``--reference gguf``: transformers' own GGUF path, which keeps them packed)
and dtype, in the same process. Greedy, ``ignore_eos``.

- TTFT: a fresh 256-token prompt (random ids, never seen before, so no prefix
  cache hit) to its first token. fnllm: wall time of the first ``step()``
  after ``add_request``; transformers: ``generate(max_new_tokens=1)``.
- TPOT: after that prompt, the mean time of each of the next ``--tokens``
  tokens. fnllm: per decode ``step()``; transformers:
  ``(generate(N+1) - generate(1)) / N`` on the same prompt.

The weight-read bound, measured in the same run: the bytes one decode step
must read (every linear weight and norm gain, the lm_head, one embedding row,
and the KV cache of the mean context over the timed tokens) over the memory
read bandwidth; no decode step can read its weights faster. The bandwidth is
measured two ways, both with ``sum`` over tensors far larger than the caches:

- ``paired`` (the target's figure): a 256 MiB probe read before the first and
  after every timed decode step. Each step is set against the mean bandwidth
  of the probes on either side of it, and the median of step time / bound is
  reported. The host's bandwidth swings between modes (about 30 and 55 GiB/s
  on the 2-core VM) from one second to the next; this compares a step with the
  machine it ran on. The probes sit outside the timed steps.
- ``best``: the best of several passes over 1 GiB (bfloat16 and float32, the
  larger taken) after fnllm's part: the highest bandwidth seen at all, hence
  the strictest bound, but often measured in a faster mode than the steps.

Each figure is the median over ``--repeats`` runs (fresh prompts each time).
Also reported: peak resident memory (``ru_maxrss``) after fnllm's part (before
transformers is loaded) and at the end, and the KV cache budget: configured
bytes, bytes of the allocated KV tensors, blocks in the pool, and the peak
number of blocks held by live sequences, and the weight bytes the executor
moved into 2 MiB pages (``FNLLM_HUGE_PAGES=0``: none, for an A/B) next to the
process's ``AnonHugePages``. ``--breakdown`` adds, after the
timed runs, where a decode step's time goes (``latency_parts.py``).

    python benchmarks/bench_latency.py [--dtype bfloat16|float32] [--prompt-len 256] [--tokens 64] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import time

import torch


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def anon_huge_pages_mib() -> float | None:
    """This process's memory in transparent huge pages (Linux; None elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
    except (OSError, StopIteration):
        return None
    return round(kib / 1024, 1)


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def run_fnllm(path, args, prompts) -> dict:
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    llm = LLM(str(path), dtype=args.dtype, device="cpu", kv_cache_memory=args.kv_memory)
    engine = llm.llm_engine
    ex = engine.executor
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens + 1, ignore_eos=True)
    ttft, tpot, peak_used = [], [], 0
    probe, paired, probe_bw = BandwidthProbe(), [], []  # paired: step time x bandwidth = bytes it could have read
    warm = prompts_for(1, args.prompt_len, ex.vocab_size, seed=999)[0]
    for k, p in enumerate([warm] + prompts):  # the first run warms up and is not counted
        engine.add_request(f"lat{k}", {"prompt_token_ids": p}, params)
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        assert outs and len(outs[0].outputs[0].token_ids) == 1, "the prompt did not finish in one step"
        steps, probes = [], [probe.read()]
        while engine.has_unfinished_requests():
            peak_used = max(peak_used, engine.state.pool.num_blocks - engine.state.pool.num_free)
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
            probes.append(probe.read())
        if k:
            ttft.append(t1 - t0)
            tpot.append(sum(steps) / len(steps))
            # each step against the bandwidth the probes on either side of it saw
            paired.extend(t * (a + b) / 2 for t, a, b in zip(steps, probes, probes[1:]))
            probe_bw.extend(probes)
    parts = None
    if args.breakdown:  # after the timed runs, with timers around the executor's parts
        from latency_parts import step_parts, weights_alone

        parts = {**step_parts(engine, prompts_for(2, args.prompt_len, ex.vocab_size, seed=7), args.tokens, params),
                 **weights_alone(ex)}
    kv_bytes = sum(c.numel() * c.element_size() for c in ex.kv_caches)
    element = torch.empty((), dtype=ex.dtype).element_size()
    per_token = bytes_per_token(ex.config, element, args.prompt_len + args.tokens / 2)
    return {
        "bytes_per_token": per_token,
        "paired_bound": {
            "probe_mib": probe.x.nbytes >> 20,
            "probe_gib_per_s_median": round(statistics.median(probe_bw) / (1 << 30), 2),
            "probe_gib_per_s_min_max": [round(min(probe_bw) / (1 << 30), 1), round(max(probe_bw) / (1 << 30), 1)],
            "tpot_over_bound_median": round(statistics.median(paired) / per_token["total"], 2),
        },
        "ttft_ms": round(statistics.median(ttft) * 1e3, 2),
        "tpot_ms": round(statistics.median(tpot) * 1e3, 2),
        "ttft_ms_all": [round(x * 1e3, 1) for x in ttft],
        "tpot_ms_all": [round(x * 1e3, 2) for x in tpot],
        "peak_rss_mib": peak_rss_mib(),
        "huge_pages": {  # FNLLM_HUGE_PAGES=0 turns the move off (fnllm.device.huge_pages)
            "weight_bytes_moved": ex.weight_bytes_in_huge_pages,
            "process_anon_huge_pages_mib": anon_huge_pages_mib(),
        },
        **({"step_parts_ms": parts} if parts else {}),
        "kv_cache": {
            "configured_bytes": args.kv_memory,
            "allocated_bytes": kv_bytes,
            "within_budget": kv_bytes <= args.kv_memory,
            "num_blocks": ex.num_blocks,
            "block_size": ex.block_size,
            "peak_blocks_in_use": peak_used,
            "peak_bytes_in_use": peak_used * kv_bytes // ex.num_blocks,
        },
    }


class BandwidthProbe:
    """The read bandwidth of the moment (bytes/s): one ``sum`` over a tensor
    of random values (no page of it can be shared or compressed by the host)
    far larger than the caches. Between decode steps it measures the machine
    the step ran on: the host's bandwidth swings between modes (~30 and ~55
    GiB/s here) from one second to the next."""

    def __init__(self, mib: int = 256, dtype: torch.dtype = torch.bfloat16):
        self.x = torch.rand((mib << 20) // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        self.x.sum()  # the first pass maps the pages; it is not timed

    def read(self) -> float:
        t = time.perf_counter()
        self.x.sum()
        return self.x.nbytes / (time.perf_counter() - t)


def read_bandwidth(gib: float = 1.0, passes: int = 5) -> dict:
    """Memory read bandwidth (bytes/s): the best of ``passes`` probe reads over ``gib``, per dtype."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        probe = BandwidthProbe(int(gib * 1024), dtype)
        rates = [probe.read() / (1 << 30) for _ in range(passes)]
        out[str(dtype).removeprefix("torch.")] = {"gib_per_s_best": round(max(rates), 2),
                                                  "gib_per_s_median": round(statistics.median(rates), 2)}
        del probe  # one probe tensor at a time
    out["bytes_per_s"] = max(v["gib_per_s_best"] for v in out.values()) * (1 << 30)
    return out


def bytes_per_token(cfg, element: int, context: float) -> dict:
    """Bytes one batch-1 decode step reads: weights (all layers, lm_head), one embedding row, the KV cache."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_layer = (q + 2 * kv) * h + h * q + 2 * i * h + i * h + 2 * h
    if cfg.attention_bias:
        per_layer += q + 2 * kv + h
    weights = (cfg.num_layers * per_layer + cfg.vocab_size * h + h + h) * element
    kv_bytes = int(cfg.num_layers * 2 * cfg.kv_size * context * element)
    return {"weights": weights, "kv_cache": kv_bytes, "total": weights + kv_bytes}


def run_transformers(path, args, prompts) -> dict:
    from bench_throughput import load_transformers

    model = load_transformers(path, args.dtype, args.reference)

    def gen(p, n):
        ids = torch.tensor([p])
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    ttft, tpot = [], []
    warm = prompts_for(1, args.prompt_len, 49152, seed=999)[0]
    with torch.inference_mode():
        gen(warm, 4)
        for p in prompts:
            t1 = gen(p, 1)
            tn = gen(p, args.tokens + 1)
            ttft.append(t1)
            tpot.append((tn - t1) / args.tokens)
    return {
        "ttft_ms": round(statistics.median(ttft) * 1e3, 2),
        "tpot_ms": round(statistics.median(tpot) * 1e3, 2),
        "ttft_ms_all": [round(x * 1e3, 1) for x in ttft],
        "tpot_ms_all": [round(x * 1e3, 2) for x in tpot],
        "weights": args.reference,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens timed after the first")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-memory", type=int, default=256 << 20)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="then where a decode step's time goes, and the weights streamed alone (latency_parts.py)")
    ap.add_argument("--reference", default="dense", choices=("dense", "gguf"),
                    help="transformers' weights: dense dequantized tensors in --dtype (default) or GGUF-packed")
    args = ap.parse_args()
    from fnllm.model.fetch import default_model_path

    path = default_model_path()
    prompts = prompts_for(args.repeats, args.prompt_len, 49152, seed=1)
    result = {
        "benchmark": "batch-1 latency (TTFT for a fresh prompt, TPOT over the following tokens; medians)",
        "model": path.name, "dtype": args.dtype, "prompt_len": args.prompt_len, "tokens": args.tokens,
        "repeats": args.repeats, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "fnllm": run_fnllm(path, args, prompts),
    }
    bw = read_bandwidth()
    per_token = result["fnllm"]["bytes_per_token"]["total"]
    bound_ms = per_token / bw["bytes_per_s"] * 1e3
    result["weight_read_bound"] = {
        "paired": result["fnllm"].pop("paired_bound"), "best": {
            "bandwidth": bw, "bound_ms": round(bound_ms, 2),
            "tpot_over_bound": round(result["fnllm"]["tpot_ms"] / bound_ms, 2)},
        "bytes_per_token": per_token, "target_ratio": 1.3,
    }
    if not args.skip_transformers:
        result["transformers"] = run_transformers(path, args, prompts)
        result["ratio_ttft"] = round(result["transformers"]["ttft_ms"] / result["fnllm"]["ttft_ms"], 2)
        result["ratio_tpot"] = round(result["transformers"]["tpot_ms"] / result["fnllm"]["tpot_ms"], 2)
        result["note"] = "ratio_* = transformers time / fnllm time (> 1: fnllm faster)"
    result["peak_rss_mib_end"] = peak_rss_mib()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
