"""The Ray backend: one actor per rank in a placement group, on a local Ray
started on demand (skipped when ``ray`` is not installed: ``pip install fnllm[ray]``).

Ray starts slowly on 2 cores, so one local Ray serves the module: TP=2,
PP=2 and TP=2 x PP=2 on the tiny Pangu give TP=1's logits (fp32 tolerance)
and greedy tokens; then killing one actor's process gives a clear error
naming the rank within 30 s, and shutting down leaves none of the workers running.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

pytest.importorskip("ray")

from fnllm.config import ParallelConfig  # noqa: E402
from fnllm.device.executor import ModelExecutor  # noqa: E402
from fnllm.executor import WorkerError, make_executor  # noqa: E402
from integration_support import tokens  # noqa: E402
from parallel_support import BLOCK, NUM_BLOCKS, engine_for, greedy_tokens, plan_sequence, wait_gone  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROMPTS = [tokens(21, 51), tokens(9, 52)]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the executors find it running and leave it be)."""
    import ray

    from fnllm.executor.ray import _start_ray

    started = _start_ray(None)
    yield
    if started:
        ray.shutdown()


def pool(path, tp: int, pp: int):
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray")
    return make_executor(str(path), parallel, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK, step_timeout_s=60)


@pytest.fixture(scope="module")
def ray_pool(local_ray, tiny_pangu):
    ex = pool(tiny_pangu[0], 2, 2)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_pangu):
    ref = ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
    return [ref.compute_logits(p) for p in plan_sequence()], greedy_tokens(engine_for(ref), PROMPTS)


def check_against(ex, reference) -> None:
    want_logits, want_tokens = reference
    for want, plan in zip(want_logits, plan_sequence()):
        torch.testing.assert_close(ex.compute_logits(plan), want, atol=2e-5, rtol=1e-5)
    assert greedy_tokens(engine_for(ex), PROMPTS) == want_tokens


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_ray_tp2_and_pp2_match_tp1(local_ray, tiny_pangu, reference, tp, pp):
    with pool(tiny_pangu[0], tp, pp) as ex:
        check_against(ex, reference)


def test_ray_tp2_pp2_matches_tp1(ray_pool, reference):
    from fnllm.executor.ray import RayDistributedExecutor

    assert isinstance(ray_pool, RayDistributedExecutor) and ray_pool.world_size == 4
    check_against(ray_pool, reference)
    stats = ray_pool.worker_stats()
    assert [(s["tp_rank"], s["pp_rank"]) for s in stats] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_ray_killed_worker_is_named_and_nothing_is_left(ray_pool):
    pids = list(ray_pool.pids)
    os.kill(pids[2], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 2 died"):
        ray_pool.compute_logits(plan_sequence()[0])
    assert time.monotonic() - t0 < 30
    assert wait_gone(pids) == []
