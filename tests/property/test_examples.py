"""Examples that pin vLLM's scheduling behaviours."""

from __future__ import annotations

import attrs

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.lifecycle import abort_request
from fnllm.state import Request, SamplingParams
from tests.property.invariants import Run, snapshot

CFG = EngineConfig(
    model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
    cache=CacheConfig(block_size=4, num_blocks=64),
    scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8, max_model_len=64),
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def req(rid, n_prompt, sp=GREEDY, start=1, **kw):
    return Request(request_id=rid, prompt_token_ids=tuple(range(start, start + n_prompt)), sampling=sp, **kw)


def test_prompt_longer_than_budget_is_chunked_and_chunks_concatenate():
    run = Run(CFG)
    run.add(req("a", 20))
    while not run.plans or run.plans[-1].num_samples[0] == 0:
        run.step()
    chunks = [p.token_ids[0] for p in run.plans]
    assert [len(c) for c in chunks] == [8, 8, 4]
    assert sum(chunks, ()) == tuple(range(1, 21))


def test_fcfs_order_holds_without_chunking():
    cfg = attrs.evolve(CFG, scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64, enable_chunked_prefill=False))
    run = Run(cfg)
    for rid, n in (("a", 30), ("b", 40), ("c", 10)):
        run.add(req(rid, n, start=len(rid)))
    run.step()
    # a (30) fits, b (40) does not fit the 34 tokens left: c must not jump ahead
    assert run.plans[0].request_ids == ("a",)
    run.step()
    assert "b" in run.plans[1].request_ids and run.plans[1].request_ids.index("b") < len(run.plans[1].request_ids)


def test_priority_admits_lower_value_first():
    cfg = attrs.evolve(CFG, scheduler=attrs.evolve(CFG.scheduler, policy="priority", max_num_seqs=1))
    run = Run(cfg)
    run.add(req("low", 4, priority=5))
    run.add(req("high", 4, priority=0, start=50))
    run.step()
    assert run.plans[0].request_ids == ("high",)


def test_preempted_request_resumes_with_the_same_tokens():
    solo = Run(CFG)
    solo.add(req("a", 6, attrs.evolve(GREEDY, max_tokens=12)))
    solo.drain(200)
    tight = attrs.evolve(CFG, cache=CacheConfig(block_size=4, num_blocks=5, enable_prefix_caching=False))
    run = Run(tight)
    run.add(req("a", 6, attrs.evolve(GREEDY, max_tokens=12)))
    run.add(req("b", 6, attrs.evolve(GREEDY, max_tokens=12), start=40))
    run.drain(500)
    assert run.preemptions > 0
    assert run.tokens[("a", 0)] == solo.tokens[("a", 0)]


def test_abort_mid_prefill_frees_all_blocks():
    run = Run(CFG)
    run.add(req("a", 30))
    run.step()
    assert run.state.pool.num_free < CFG.cache.num_blocks
    run.state = abort_request(run.state, "a")
    assert run.state.pool.num_free == CFG.cache.num_blocks
    assert not run.state.requests and not run.state.running.seq_ids


def test_prefix_cache_hit_counts_as_computed():
    run = Run(CFG)
    run.add(req("a", 12))
    run.drain(100)
    run.add(req("b", 14))
    run.step()
    # 12 tokens = 3 full blocks cached; b starts at 12 and computes 2
    assert run.plans[-1].positions == (12,) and len(run.plans[-1].token_ids[0]) == 2


def test_n_samples_share_prompt_blocks_and_copy_on_write():
    run = Run(CFG)
    run.add(req("a", 6, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, ignore_eos=True)))
    run.step()  # prefill, forks into 3
    assert len(run.state.running) == 3
    tables = run.state.running.tables
    assert tables[0] == tables[1] == tables[2]
    run.step()  # each child writes into the shared partial block: two copies
    assert len(run.plans[-1].copies) == 2
    run.drain(50)
    assert {i for (r, i) in run.tokens} == {0, 1, 2}


def test_rejections_are_values_and_change_nothing():
    run = Run(CFG)
    run.add(req("a", 4))
    before = snapshot(run.state)
    for bad in (
        req("a", 4),  # duplicate live id
        Request(request_id="e", prompt_token_ids=()),
        req("long", 70),
        req("big", 10, SamplingParams(max_tokens=60)),
        Request(request_id="oov", prompt_token_ids=(1, 500)),
    ):
        assert not run.add(bad)
        assert snapshot(run.state) == before
    assert set(run.rejected) == {"a", "e", "long", "big", "oov"}
    small = attrs.evolve(CFG, cache=CacheConfig(block_size=4, num_blocks=2))
    r2 = Run(small)
    assert not r2.add(req("x", 12)) and "could never be scheduled" in r2.rejected["x"]
    assert abort_request(run.state, "nope") is run.state
