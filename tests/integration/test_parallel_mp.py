"""Tensor and pipeline parallelism on the mp backend (worker processes, gloo on CPU).

A tiny random Pangu (4 query / 2 KV heads, 2 layers, bias on q/k/v/o): TP=2,
PP=2 and TP=2 x PP=2 give the logits of TP=1 within fp32 tolerance over
prefill chunks, a block copy, mixed and pure-decode steps, and the same
greedy tokens through the engine. Each layout's workers are started once per
module. Then: each rank holds ~1/TP of the parameters and of the KV cache; a
hung worker and a killed worker each give a clear error naming the rank, in
bounded time, with no process left behind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from fnllm.config import ParallelConfig
from fnllm.device.executor import ModelExecutor
from fnllm.executor import WorkerError
from fnllm.executor.multiproc import MultiprocExecutor
from integration_support import tokens
from parallel_support import BLOCK, NUM_BLOCKS, engine_for, greedy_tokens, plan_sequence, wait_gone

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}
PROMPTS = [tokens(21, 41), tokens(7, 42), tokens(40, 43)]


@pytest.fixture(scope="module")
def reference(tiny_pangu):
    ex = ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
    logits = [ex.compute_logits(p) for p in plan_sequence()]
    return logits, greedy_tokens(engine_for(ex), PROMPTS)


@pytest.fixture(scope="module")
def pools(tiny_pangu):
    """One worker pool per layout, started lazily, shut down at the end of the module."""
    started: dict[str, MultiprocExecutor] = {}

    def get(name: str, **kw) -> MultiprocExecutor:
        if name not in started:
            tp, pp = LAYOUTS[name]
            started[name] = MultiprocExecutor(
                str(tiny_pangu[0]), ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK, **kw)
        return started[name]

    yield get
    for ex in started.values():
        ex.shutdown()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(pools, reference, layout):
    ex = pools(layout, step_timeout_s=60)
    want_logits, want_tokens = reference
    for want, plan in zip(want_logits, plan_sequence()):
        torch.testing.assert_close(ex.compute_logits(plan), want, atol=2e-5, rtol=1e-5)
    assert greedy_tokens(engine_for(ex), PROMPTS) == want_tokens


def test_each_rank_holds_its_shard(pools, tiny_pangu):
    stats = pools("tp2").worker_stats()
    ref = ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK, attn_backend="torch")
    total_params = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    total_kv = sum(c.numel() * c.element_size() for c in ref.kv_caches)
    from fnllm.device import cpu_kernels

    fused = cpu_kernels.load() is not None  # then every rank runs the fused kernels on its own heads
    for s in stats:
        assert s["kv_heads"] == 1 and s["heads"] == 2
        assert s["backend"] == ("FusedCpuBackend" if fused else "TorchBackend")
        assert s["kv_bytes"] == total_kv // 2
        # everything is split but the norms and o's bias (replicated): a hair over half
        assert total_params / 2 <= s["param_bytes"] <= total_params / 2 * 1.02, (s["param_bytes"], total_params)
    assert len({s["pid"] for s in stats}) == 2 and os.getpid() not in {s["pid"] for s in stats}
    pp = pools("pp2").worker_stats()
    assert [s["layers"] for s in pp] == [[0, 1], [1, 2]]
    assert all(s["kv_bytes"] == total_kv // 2 for s in pp)


def test_hung_worker_is_named_and_stopped(pools):
    ex = pools("pp2")
    ex.step_timeout_s = 3.0
    plan = plan_sequence()[0]
    ex.compute_logits(plan)
    pids = list(ex.pids)
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    # stage 0 waits for stage 1 inside the step, so both are late: the error names them
    with pytest.raises(WorkerError, match=r"rank\(s\) \[(0, )?1\] did not answer 'compute_logits' within 3 s \(hung\?\)"):
        ex.compute_logits(plan)
    assert time.monotonic() - t0 < 20
    assert wait_gone(pids) == []
    with pytest.raises(WorkerError, match="workers are gone"):
        ex.execute(plan)


def test_killed_worker_is_named_within_30s_and_nothing_is_left(pools):
    ex = pools("tp2")
    engine = engine_for(ex)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"k{i}", p)
    engine.step()
    pids = list(ex.pids)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 (died|is gone)"):
        for _ in range(20):
            engine.step()
    assert time.monotonic() - t0 < 30
    assert wait_gone(pids) == []
