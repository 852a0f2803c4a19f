"""What tensor parallelism costs per decode step: Pangu-7B shape, TP=1 vs TP=2 on CPU (gloo).

The model is openPangu-Embedded-7B's shape with ``--layers`` decoder layers
and random bf16 weights (the checkpoint of ``bench_pangu_shape.py``). TP=1
runs in-process (the ``uni`` executor, all cores); TP=2 runs two worker
processes (the ``mp`` executor, cores split between them) that all-reduce
after o and down and gather the vocab-parallel logits on rank 0. For each
layout and batch size, ``B`` prompts are prefilled, then ``--steps`` decode
steps (``LLMEngine.step``) are timed one by one; per step and per rank the
workers count what went through torch.distributed:

- bytes all-reduced (expected: (2 * layers + 1) * B * hidden * 2 bytes: o, down, embedding)
  and bytes gathered (B * vocab / TP * 2 bytes of logits);
- seconds inside collectives (waiting for the peer included) against the rest of the step;
- parameter and KV bytes per rank, and each process's peak RSS.

With 2 cores no speed-up is expected: the figure is the overhead. Noisy when
other work shares the machine; both layouts run in the same invocation.

    python benchmarks/bench_parallel.py [--layers 2] [--batches 1 8] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pangu_shape import CONFIG, checkpoint_dir, write_shards  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def make_engine(path: Path, tp: int, num_blocks: int, block_size: int):
    from fnllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from fnllm.engine import LLMEngine
    from fnllm.executor import make_executor

    parallel = ParallelConfig(tensor_parallel_size=tp)
    ex = make_executor(str(path), parallel, dtype="bfloat16", device="cpu", num_blocks=num_blocks, block_size=block_size)
    config = EngineConfig(
        model=ModelConfig(model=str(path), dtype="bfloat16", device="cpu", vocab_size=ex.vocab_size),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=4096),
        parallel=parallel,
    )
    return ex, LLMEngine(config, ex, None)


def decode_run(ex, engine, batch: int, prompt_len: int, steps: int, tag: str) -> dict:
    from fnllm.state import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
    for r in range(batch):
        engine.add_request(f"{tag}-{r}", [rng.randrange(100, 150000) for _ in range(prompt_len)], params)
    engine.step()  # prefill
    engine.step()  # warm-up decode
    ex.reset_worker_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    stats = ex.worker_stats()
    while engine.has_unfinished_requests():
        engine.step()
    step_ms = statistics.median(times) * 1e3
    total_ms = sum(times) * 1e3
    ranks = []
    for s in stats:
        c = s["comm"]
        comm_ms = sum(v for k, v in c.items() if k.endswith("_s")) * 1e3
        ranks.append({
            "rank": s["rank"],
            "all_reduce_bytes_per_step": int(c.get("all_reduce_bytes", 0) / steps),
            "all_reduces_per_step": c.get("all_reduce_calls", 0) / steps,
            "gather_bytes_per_step": int(c.get("gather_bytes", 0) / steps),
            "collective_ms_per_step": round(comm_ms / steps, 2),
            "other_ms_per_step": round((total_ms - comm_ms) / steps, 2),
            "collective_share": round(comm_ms / total_ms, 3),
        })
    return {"step_ms": round(step_ms, 2), "step_ms_all": [round(t * 1e3, 1) for t in times], "ranks": ranks}


def memory(ex) -> list[dict]:
    out = []
    for s in ex.worker_stats():
        pid = s.get("pid", os.getpid())
        out.append({"rank": s["rank"], "param_mib": round(s["param_bytes"] / 2**20, 1),
                    "kv_mib": round(s["kv_bytes"] / 2**20, 1), "peak_rss_mib": peak_rss_mib(pid)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args()
    h, v, n = CONFIG["hidden_size"], CONFIG["vocab_size"], args.layers
    result = {
        "benchmark": "tensor parallel decode overhead, Pangu-7B shape (random bf16 weights), TP=1 (uni) vs TP=2 (mp, gloo)",
        "layers": n, "prompt_len": args.prompt_len, "timed_steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "expected_all_reduce_bytes_per_step": {f"batch_{b}": (2 * n + 1) * b * h * 2 for b in args.batches},
        "expected_gather_bytes_per_step_tp2": {f"batch_{b}": b * (v // 2) * 2 for b in args.batches},
        "layouts": {},
    }
    per_blocks = -(-(args.prompt_len + args.steps + 4) // args.block_size)
    num_blocks = max(args.batches) * per_blocks + 4
    with tempfile.TemporaryDirectory(prefix="fnllm-parallel-") as tmp:
        root = Path(tmp)
        write_shards(root, n)
        path = checkpoint_dir(root, n)
        for tp in (1, 2):
            t0 = time.perf_counter()
            ex, engine = make_engine(path, tp, num_blocks, args.block_size)
            run = {"start_s": round(time.perf_counter() - t0, 1), "memory_per_rank": memory(ex)}
            for b in args.batches:
                run[f"batch_{b}"] = decode_run(ex, engine, b, args.prompt_len, args.steps, f"tp{tp}b{b}")
            run["memory_per_rank"] = memory(ex)
            ex.shutdown()
            result["layouts"][f"tp{tp}"] = run
    for b in args.batches:
        t1 = result["layouts"]["tp1"][f"batch_{b}"]["step_ms"]
        t2 = result["layouts"]["tp2"][f"batch_{b}"]["step_ms"]
        r0 = result["layouts"]["tp2"][f"batch_{b}"]["ranks"][0]
        result[f"batch_{b}"] = {
            "tp1_step_ms": t1, "tp2_step_ms": t2, "tp2_over_tp1": round(t2 / t1, 3),
            "tp2_collective_ms_per_step_rank0": r0["collective_ms_per_step"],
            "tp2_collective_share_rank0": r0["collective_share"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
