"""Fault isolation, pinned: what a failed plan may have written is never
read again, the poison request ends with an error, the others finish with
the tokens of a healthy run, and the pool comes back whole.

Each scenario fails without :func:`fnllm.faults.repair_after_failure`: the
fake device reads KV back through block tables, so a clobbered block or a
stale cached prefix gives a different token.
"""

from __future__ import annotations

import attrs
import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.errors import EngineDeadError
from fnllm.faults import plan_subset, repair_after_failure, written_offsets
from fnllm.invariants import check_invariants
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Request, SamplingParams
from fnllm.trace import TraceWriter, read_trace
from fnllm.replay import verify

VOCAB = 97
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def config(num_blocks: int, block_size: int = 2, caching: bool = False, max_num_seqs: int = 4) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(0,)),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=max_num_seqs, max_model_len=64),
    )


class Failing:
    """A fake device that fails, after writing KV, on plans matching ``when``."""

    def __init__(self, cfg: EngineConfig, when) -> None:
        self.inner = FakeExecutor(cfg.cache.num_blocks, cfg.cache.block_size, VOCAB)
        self.when, self.failures = when, 0

    def execute(self, plan):
        out = self.inner.execute(plan)
        if self.when(plan):
            self.failures += 1
            raise RuntimeError("device fault")
        return out


def run(engine: LLMEngine, cfg: EngineConfig) -> dict:
    finals = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            assert o.request_id not in finals
            if o.finished:
                finals[o.request_id] = o
        check_invariants(engine.state, cfg)
    assert not engine.has_unfinished_requests()
    assert engine.state.pool.num_free == cfg.cache.num_blocks
    return finals


def solo(cfg: EngineConfig, prompt, params: SamplingParams = GREEDY) -> list[int]:
    roomy = config(64, cfg.cache.block_size)
    engine = LLMEngine(roomy, FakeExecutor(64, roomy.cache.block_size, VOCAB))
    engine.add_request("s", list(prompt), params)
    return run(engine, roomy)["s"].outputs[0].token_ids


def test_failed_plan_that_reused_a_preempted_sequences_blocks():
    # y needs a new block at position 4; the pool is full, so x (latest) is
    # preempted and y writes into x's block 0. That plan fails after the write:
    # x must not keep its (now clobbered) blocks.
    cfg = config(num_blocks=4)
    dev = Failing(cfg, lambda p: any(r == "y" and pos >= 4 for r, pos in zip(p.request_ids, p.positions)))
    engine = LLMEngine(cfg, dev)
    engine.add_request("y", [5, 6, 7], GREEDY)
    engine.add_request("x", [8, 9, 10], GREEDY)
    finals = run(engine, cfg)
    assert dev.failures >= 2  # the plan and its retry
    assert finals["y"].outputs[0].finish_reason == "error" and "device fault" in finals["y"].error
    assert finals["x"].outputs[0].token_ids == solo(cfg, [8, 9, 10])


def test_failed_plan_that_evicted_a_cached_prefix():
    # a's two full blocks stay cached after it finishes; b evicts them and its
    # plan fails after writing; c, with a's prompt, must not hit the stale cache.
    cfg = config(num_blocks=4, caching=True)
    dev = Failing(cfg, lambda p: "b" in p.request_ids)
    engine = LLMEngine(cfg, dev)
    prompt_a = [11, 12, 13, 14, 15]
    engine.add_request("a", prompt_a, SamplingParams(temperature=0.0, max_tokens=1))
    run(engine, cfg)
    engine.add_request("b", [40, 41, 42, 43, 44, 45, 46], SamplingParams(temperature=0.0, max_tokens=1))
    assert run(engine, cfg)["b"].outputs[0].finish_reason == "error"
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request("c", prompt_a, short)
    assert run(engine, cfg)["c"].outputs[0].token_ids == solo(cfg, prompt_a, short)


def test_poison_request_isolated_others_unchanged_and_replayed(tmp_path):
    cfg = config(num_blocks=32, max_num_seqs=8)
    dev = Failing(cfg, lambda p: "bad" in p.request_ids)
    path = str(tmp_path / "t.jsonl")
    engine = LLMEngine(cfg, dev, recorder=TraceWriter(path))
    prompts = {f"r{i}": [3 + i, 4 + i, 5 + i] for i in range(5)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    engine.add_request("bad", [1, 2, 3], GREEDY)
    finals = run(engine, cfg)
    engine.recorder.close()
    assert finals["bad"].outputs[0].finish_reason == "error"
    for rid, p in prompts.items():
        assert finals[rid].outputs[0].token_ids == solo(cfg, p)
    assert engine.consecutive_failures == 0
    trace = read_trace(path)
    assert any(e["type"] == "fault" and e["errors"] == ["bad"] for e in trace.events)
    assert verify(trace) is None  # the fault (repair + error) replays through the pure core


def test_dead_device_raises_after_k_failures_and_keeps_every_block():
    # with no sub-plan running, each failed step ends its batch with errors
    # and counts; the third raises, with 6 of the 30 requests still live
    cfg = config(num_blocks=64, max_num_seqs=8)
    dev = Failing(cfg, lambda p: True)
    engine = LLMEngine(cfg, dev, max_consecutive_failures=3)
    for i in range(30):
        engine.add_request(f"r{i}", [3, 4, 5 + i], GREEDY)
    with pytest.raises(EngineDeadError, match="3 consecutive steps failed on the executor"):
        for _ in range(3):
            engine.step()
    assert len(engine.state.requests) == 6
    with pytest.raises(EngineDeadError):
        engine.step()
    with pytest.raises(EngineDeadError):
        engine.add_request("late", [1, 2], GREEDY)
    check_invariants(engine.state, cfg)
    engine.abort_request(list(engine.state.requests.keys()))
    assert engine.state.pool.num_free == cfg.cache.num_blocks


def test_transient_fault_is_retried_without_a_trace():
    cfg = config(num_blocks=32)
    fails = iter([True])
    dev = Failing(cfg, lambda p: next(fails, False))
    engine = LLMEngine(cfg, dev)
    engine.add_request("a", [3, 4, 5], GREEDY)
    finals = run(engine, cfg)
    assert dev.failures == 1 and finals["a"].outputs[0].token_ids == solo(cfg, [3, 4, 5])


def test_plan_subset_writes_a_subset_of_the_plans_slots():
    cfg = config(num_blocks=16)
    state = initial_state(cfg)
    for i in range(3):
        state = add_request(state, Request(request_id=f"r{i}", prompt_token_ids=(1, 2, 3 + i)), cfg)
    _, plan = schedule(state, cfg)
    whole = written_offsets(plan, 2)
    for rows in ([0], [1, 2], [2]):
        sub = written_offsets(plan_subset(plan, rows), 2)
        assert all(b in whole and whole[b] <= off for b, off in sub.items())
    assert repair_after_failure(state, plan, cfg) == state  # nothing computed was written: nothing to repair


def test_failed_plan_that_swapped_a_victim_out_is_not_rerun():
    # as above, under preemption_mode="swap": x's blocks go to the host tier and
    # y writes into x's old block, then the plan fails. Running the plan again
    # would copy y's token to the host as x's KV; instead x is recomputed.
    cfg = config(num_blocks=4)
    cfg = attrs.evolve(cfg, cache=attrs.evolve(cfg.cache, num_host_blocks=8),
                       scheduler=attrs.evolve(cfg.scheduler, preemption_mode="swap"))
    calls = []

    def fails(plan):  # the first run of each plan that swaps out fails (after writing)
        if plan.swap_out and plan.step not in calls:
            calls.append(plan.step)
            return True
        return False

    dev = Failing(cfg, fails)
    engine = LLMEngine(cfg, dev)
    engine.add_request("y", [5, 6, 7], GREEDY)
    engine.add_request("x", [8, 9, 10], GREEDY)
    finals = run(engine, cfg)
    assert calls and dev.failures == len(calls)
    for rid, prompt in (("x", [8, 9, 10]), ("y", [5, 6, 7])):
        assert finals[rid].outputs[0].token_ids == solo(cfg, prompt)
