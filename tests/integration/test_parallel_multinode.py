"""Multi-node mp, both "nodes" on this host: node 1 is the headless launcher
(``python -m fnllm.headless`` with NNODES=2, NODE_RANK=1 and the
same model arguments), node 0 the driver. TP=2 spans the two nodes: rank 0
relays each plan to rank 1 over torch.distributed and answers for both. The
logits equal TP=1's; shutting the driver down ends the other node too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnllm.config import ParallelConfig
from fnllm.device.executor import ModelExecutor
from fnllm.distributed import get_open_port
from fnllm.executor.multiproc import MultiprocExecutor
from parallel_support import BLOCK, NUM_BLOCKS, plan_sequence, wait_gone

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_nodes_tp2(tiny_pangu, monkeypatch):
    path = str(tiny_pangu[0])
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(get_open_port()), "NNODES": "2"}
    node1 = subprocess.Popen(
        [sys.executable, "-m", "fnllm.headless", "--model", path, "--device", "cpu", "-tp", "2",
         "--num-kv-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK)],
        cwd=REPO, env={**__import__("os").environ, **env, "NODE_RANK": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("NODE_RANK", "0")
        ref = ModelExecutor(path, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
        with MultiprocExecutor(path, ParallelConfig(tensor_parallel_size=2), device="cpu", num_blocks=NUM_BLOCKS,
                               block_size=BLOCK, step_timeout_s=60, start_timeout_s=120) as ex:
            assert (ex.nnodes, len(ex.procs)) == (2, 1)
            for plan in plan_sequence():
                torch.testing.assert_close(ex.compute_logits(plan), ref.compute_logits(plan), atol=2e-5, rtol=1e-5)
            stats = ex.worker_stats()
            assert [s["rank"] for s in stats] == [0, 1] and stats[0]["kv_heads"] == stats[1]["kv_heads"] == 1
        assert node1.wait(timeout=30) == 0, node1.stderr.read()
        assert wait_gone([s["pid"] for s in stats]) == []
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
