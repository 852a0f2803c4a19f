"""A headless node of a multi-node ``mp`` deployment (``python -m fnllm.headless``).

Every node but the driver's runs this with the driver's model arguments and
the torchrun-style environment (``NNODES``, ``NODE_RANK`` >= 1,
``MASTER_ADDR``, ``MASTER_PORT``): it starts this node's ranks and waits
until the driver's shutdown reaches them. A shell entry point, like the CLI:
it may import ``fnllm.cli``; the executors never do.
"""

from __future__ import annotations

import os

from fnllm.cli import _add_model_args
from fnllm.config import ParallelConfig
from fnllm.executor.multiproc import MultiprocExecutor
from fnllm.model.fetch import default_model_path


def main(argv: list[str] | None = None) -> int:
    """A headless node of a multi-node mp deployment: start this node's ranks and wait.

    Run with the same model arguments as the driver's node and the torchrun-style
    environment (``NNODES``, ``NODE_RANK`` >= 1, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m fnllm.headless", description=main.__doc__.split("\n")[0])
    _add_model_args(ap)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes per rank (as LLM's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if int(os.environ.get("NODE_RANK", "0")) < 1:
        ap.error("a headless node needs NODE_RANK >= 1 (node 0 runs the driver)")
    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                              pipeline_parallel_size=args.pipeline_parallel_size, distributed_executor_backend="mp")
    ex = MultiprocExecutor(args.model or str(default_model_path()), parallel, dtype=args.dtype, device=args.device,
                           num_blocks=args.num_kv_blocks, kv_cache_bytes=args.kv_cache_memory,
                           block_size=args.block_size, seed=args.seed)
    signal.signal(signal.SIGTERM, lambda *_: ex.shutdown())
    print(f"fnllm: node {ex.node_rank} serving ranks {[p.name for p in ex.procs]}", flush=True)
    for p in ex.procs:  # until the driver's shutdown reaches them
        p.join()
    ex.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
