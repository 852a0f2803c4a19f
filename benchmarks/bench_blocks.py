"""Block pool cost per step must not grow with the pool.

256 sequences each append one token per step (block size 16: a new block
every 16 tokens; a sequence that reaches 3 blocks caches its full blocks and
frees its table, then starts again), in a pool of 1,000 and of 100,000
blocks. Both pools start fully cached, so every allocation evicts the least
recently used block and every free re-enters the LRU: the persistent maps
really hold ~1k and ~100k entries. Prints JSON: microseconds per 256
appends for each pool, and the ratio (target: <= 1.5).
"""

from __future__ import annotations

import gc
import json
import time

from fnllm.blocks import PoolEdit, chain_hashes, new_pool

SEQS, BS, MAX_BLOCKS = 256, 16, 3


def prefill_cache(pool, n_cached: int):
    """Allocate, cache and free ``n_cached`` blocks so they sit in the LRU."""
    e = PoolEdit(pool)
    blocks = e.allocate(n_cached)
    for k, b in enumerate(blocks):
        toks = tuple(range(k * BS, (k + 1) * BS))
        (h,) = chain_hashes(toks, BS, extra=("warm",))
        e.cache(b, h, (None, toks, ("warm",)))
    e.free_table(blocks)
    return e.finish()


def run(num_blocks: int, steps: int, evict: bool) -> float:
    """µs per step; with ``evict`` the pool starts fully cached and freed blocks are cached."""
    pool = new_pool(num_blocks, BS)
    if evict:
        pool = prefill_cache(pool, num_blocks)
    uid = 0
    lens = [k % (BS * MAX_BLOCKS) for k in range(SEQS)]  # staggered
    tables: list[list[int]] = [[] for _ in range(SEQS)]
    gc.collect()
    gc.freeze()  # the warm pool is long-lived, as in an engine that has run a while
    t0 = time.perf_counter()
    for step in range(steps):
        e = PoolEdit(pool)
        for s in range(SEQS):
            n = lens[s]
            if n == BS * MAX_BLOCKS:
                for b in tables[s] if evict else ():
                    uid += 1
                    toks = (uid,) * BS
                    (h,) = chain_hashes(toks, BS)
                    e.cache(b, h, (None, toks, ()))
                e.free_table(tables[s])
                tables[s], n = [], 0
            if n % BS == 0:
                tables[s].extend(e.allocate(1))
            lens[s] = n + 1
        pool = e.finish()
    spent = time.perf_counter() - t0
    gc.unfreeze()
    return spent / steps * 1e6


def main() -> None:
    steps = 400
    run(1000, 20, False)  # warm up
    out = {"benchmark": "block pool: 256 appends per step (block size 16)", "target_ratio": 1.5}
    for name, evict in (("append", False), ("append_with_eviction", True)):
        small = min(run(1000, steps, evict) for _ in range(3))
        large = min(run(100_000, steps, evict) for _ in range(3))
        out[name] = {
            "us_per_256_appends_pool_1k": round(small, 1),
            "us_per_256_appends_pool_100k": round(large, 1),
            "ratio_100k_over_1k": round(large / small, 3),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
