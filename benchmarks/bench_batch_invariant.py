"""The cost of ``batch_invariant=True``: interleaved A/B on identical plans.

Two executors over the demo model (bf16 by default), the default kernels (A)
and ``batch_invariant=True`` (B), run the same plans in turn, A B A B ...:
a 256-token prompt as one chunk, a decode step of 16 rows with 200 tokens of
context, and a decode step of 1 row with 256. Prints per plan the median
time of each, the cost in percent (B / A - 1) and the ratio of every pair
(pairs cancel the drift of a shared machine better than two separate runs).
``--threads 1`` measures without OpenMP barriers, which an overloaded
machine turns into noise. The end-to-end figure is
``bench_throughput.py --batch-invariant``.

    python benchmarks/bench_batch_invariant.py [--repeats 7] [--threads N] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from fnllm.device.executor import ModelExecutor
from fnllm.model.fetch import default_model_path
from fnllm.state import BatchPlan, SamplingParams

BLOCK, NUM_BLOCKS, VOCAB = 16, 1200, 49152


def plan_of(rows: list[tuple[list[int], int, list[int]]]) -> BatchPlan:
    """Rows of (new token ids, start position, block table); every row samples greedily."""
    n = len(rows)
    return BatchPlan(step=0, seq_ids=tuple(range(n)), request_ids=tuple(f"r{i}" for i in range(n)), copies=(),
                     token_ids=tuple(tuple(t) for t, _, _ in rows), positions=tuple(p for _, p, _ in rows),
                     block_tables=tuple(tuple(b) for _, _, b in rows), num_samples=(1,) * n, sample_index=(0,) * n,
                     output_pos=(0,) * n, sampling=(SamplingParams(temperature=0.0),) * n)


def plans() -> dict[str, BatchPlan]:
    rng = random.Random(0)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)

    def table(tokens: int) -> list[int]:
        return [free.pop() for _ in range(-(-tokens // BLOCK))]

    ids = lambda n: [rng.randrange(100, VOCAB - 100) for _ in range(n)]  # noqa: E731
    return {
        "prefill_256": plan_of([(ids(256), 0, table(256))]),
        "decode_b16_ctx200": plan_of([(ids(1), 200, table(201)) for _ in range(16)]),
        "decode_b1_ctx256": plan_of([(ids(1), 256, table(257))]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    exs = {bi: ModelExecutor(path, dtype=args.dtype, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK,
                             batch_invariant=bi) for bi in (False, True)}
    result: dict = {"benchmark": "batch_invariant cost, interleaved A/B", "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "repeats": args.repeats}
    for name, plan in plans().items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for bi in (False, True):  # the KV of the context rows is whatever the cache holds: same for both
            exs[bi].compute_logits(plan)
        for _ in range(args.repeats):
            for bi in (False, True):
                t = time.perf_counter()
                exs[bi].compute_logits(plan)
                times[bi].append(time.perf_counter() - t)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        result[name] = {"default_ms": round(a * 1e3, 2), "batch_invariant_ms": round(b * 1e3, 2),
                        "cost_pct": round(100 * (b / a - 1), 1),
                        "pair_ratios": [round(y / x, 2) for x, y in zip(times[False], times[True])]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
