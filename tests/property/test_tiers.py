"""Tiered KV memory in the pure core: swap preemption, the host tier, the
host prefix cache. With the fake executor (which emulates both tiers) any
missed, misdirected or misordered move changes a token, so "same tokens as
a roomy run" is the correctness property; the invariants (17-19 included)
are checked after every transition by :class:`~tests.property.invariants.Run`."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor, KVReadError
from fnllm.invariants import check_plan
from fnllm.lifecycle import abort_request
from fnllm.schedule import schedule
from fnllm.state import InvariantError, Request, SamplingParams, SeqStatus
from tests.property.invariants import Run, step_bound
from tests.property.strategies import EOS, VOCAB, engine_configs, prompts, sampling_params
from tests.property.test_differential import REFERENCE, run_all
from tests.property.test_scheduler_machine import SchedulerMachine

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def cfg(num_blocks=6, host=16, mode="swap", caching=False, budget=64, seqs=4) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(EOS,)),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching, num_host_blocks=host),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=64, preemption_mode=mode),
    )


def req(rid: str, prompt, sp=GREEDY) -> Request:
    return Request(request_id=rid, prompt_token_ids=tuple(prompt), sampling=sp)


workloads = st.lists(st.tuples(prompts(), sampling_params()), min_size=1, max_size=6)


@given(workload=workloads, host=st.sampled_from((1, 4, 64)), caching=st.booleans(), eos_every=st.sampled_from((0, 7)))
def test_same_tokens_under_swap_preemption(workload, host, caching, eos_every):
    """A pool just big enough for the largest request forces preemptions; under
    swap (falling back to recompute when the host tier is full) the tokens are the roomy run's."""
    requests = [req(f"r{i}", p, sp) for i, (p, sp) in enumerate(workload)]
    need = max(len(r.prompt_token_ids) + r.sampling.max_tokens - 1 for r in requests)
    tight = attrs.evolve(
        REFERENCE,
        cache=CacheConfig(block_size=2, num_blocks=-(-need // 2), enable_prefix_caching=caching, num_host_blocks=host),
        scheduler=attrs.evolve(REFERENCE.scheduler, preemption_mode="swap"),
    )
    ref = run_all(REFERENCE, requests, eos_every)
    got = run_all(tight, requests, eos_every)
    assert got.tokens == ref.tokens
    assert got.finish == ref.finish


class SwapMachine(SchedulerMachine):
    """The scheduler machine on cramped pools under swap preemption: every
    invariant after every rule, and liveness (drain) with swapped sequences."""

    @initialize(config=engine_configs(swap=True, tight=True), eos_every=st.sampled_from((0, 0, 5, 9)))
    def setup(self, config, eos_every):
        self.run = Run(config, eos_every=eos_every)
        self.added: list[Request] = []
        self.aborted: dict[str, tuple[int, int]] = {}
        self.n = 0


TestSwapScheduler = SwapMachine.TestCase
TestSwapScheduler.settings = settings(settings.default, max_examples=100)


# -- pinned behaviours ---------------------------------------------------------------


def _cramped(mode="swap", host=16, caching=False):
    """Two requests of 10 tokens + 6 outputs in 6 blocks of 4: the second is preempted."""
    run = Run(cfg(num_blocks=6, host=host, mode=mode, caching=caching))
    run.add(req("a", range(1, 11)))
    run.add(req("b", range(20, 30)))
    return run


def _step_until(run, pred, limit=40):
    for _ in range(limit):
        run.step()
        if pred(run):
            return
    raise AssertionError("condition never reached")


def test_swap_preemption_moves_kv_to_host_and_back():
    run = _cramped()
    _step_until(run, lambda r: any(s.status == SeqStatus.SWAPPED for s in r.state.waiting))
    (seq,) = [s for s in run.state.waiting if s.status == SeqStatus.SWAPPED]
    out_plan = run.plans[-1]
    assert [h for _, h in out_plan.swap_out] == list(seq.swapped)
    assert seq.num_computed > 0 and run.state.num_preemptions == 1
    _step_until(run, lambda r: r.plans[-1].swap_in)
    back = run.plans[-1]
    assert [h for h, _ in back.swap_in] == list(seq.swapped)
    r = back.seq_ids.index(seq.seq_id)
    assert back.positions[r] == seq.num_computed, "a swapped sequence resumes where it stopped (no recompute)"
    assert [d for _, d in back.swap_in] == list(back.block_tables[r][: len(seq.swapped)])
    run.drain(100)
    ref = Run(cfg(num_blocks=64, host=0, mode="recompute"))
    ref.add(req("a", range(1, 11)))
    ref.add(req("b", range(20, 30)))
    ref.drain(100)
    assert run.tokens == ref.tokens
    assert run.state.pool.host.num_free == 16


def test_full_host_tier_falls_back_to_recompute():
    run = _cramped(host=1)  # the victim needs more than one host block
    _step_until(run, lambda r: r.preemptions > 0)
    assert all(s.status != SeqStatus.SWAPPED for s in run.state.waiting)
    assert any(s.status == SeqStatus.PREEMPTED for s in run.state.waiting)
    assert not any(p.swap_out for p in run.plans)
    run.drain(100)


def test_recompute_mode_never_swaps():
    run = _cramped(mode="recompute")
    run.drain(100)
    assert run.preemptions > 0 and not any(p.swap_out or p.swap_in for p in run.plans)


def test_abort_of_a_swapped_request_frees_its_host_blocks():
    run = _cramped()
    _step_until(run, lambda r: any(s.swapped for s in r.state.waiting))
    (seq,) = [s for s in run.state.waiting if s.swapped]
    run.state = abort_request(run.state, seq.request_id)
    assert run.state.pool.host.num_free == run.state.pool.host.num_blocks
    run.drain(100)


def test_missed_swap_in_changes_tokens():
    """The fake device emulates the host tier: a device that skips swap_in reads other KV."""

    class Forgetful(FakeExecutor):
        def execute(self, plan):
            return super().execute(attrs.evolve(plan, swap_in=()))

    run = _cramped()
    run.ex = Forgetful(6, 4, VOCAB, EOS)
    ref = _cramped()
    ref.drain(100)
    try:
        run.drain(100)
        same = run.tokens == ref.tokens
    except KVReadError:
        same = False
    assert not same


def test_plan_without_its_swap_in_is_caught_by_invariant_19():
    run = _cramped()
    _step_until(run, lambda r: any(s.swapped for s in r.state.waiting))
    for _ in range(40):
        after, plan = schedule(run.state, run.config)
        if plan.swap_in:
            break
        run.step()
    with pytest.raises(InvariantError, match="invariant 19"):
        check_plan(run.state, after, attrs.evolve(plan, swap_in=()), run.config)
    bad = attrs.evolve(plan, swap_in=tuple((h, d) for (h, _), (_, d) in zip(plan.swap_in, plan.swap_in[::-1])))
    if len(plan.swap_in) > 1:
        with pytest.raises(InvariantError, match="invariant 19"):
            check_plan(run.state, after, bad, run.config)


def test_host_prefix_cache_swaps_in_instead_of_recomputing():
    """A finished request's cached blocks, evicted by another request, are
    offloaded to the host tier; the same prompt later comes back from there."""
    run = Run(cfg(num_blocks=6, host=8, mode="recompute", caching=True))
    prompt = list(range(1, 13))  # 3 full blocks
    run.add(req("a", prompt, SamplingParams(temperature=0.0, max_tokens=1)))
    run.drain(20)
    run.add(req("b", range(40, 60), SamplingParams(temperature=0.0, max_tokens=1)))  # evicts a's blocks
    run.drain(20)
    offloaded = [p for p in run.plans if p.swap_out]
    assert offloaded and len(run.state.pool.host.hash_of) >= 2
    run.add(req("c", prompt, SamplingParams(temperature=0.0, max_tokens=1)))
    run.step()
    plan = run.plans[-1]
    assert plan.swap_in and plan.positions[0] == 8, "two full blocks hit (the last prompt token is always computed)"
    assert run.state.prefix_cache_hits >= 8 and run.state.prefix_cache_queries >= 12 + 20 + 12
    run.drain(20)
    ref = Run(cfg(num_blocks=64, host=0, mode="recompute"))
    ref.add(req("c", prompt, SamplingParams(temperature=0.0, max_tokens=1)))
    ref.drain(20)
    assert run.tokens[("c", 0)] == ref.tokens[("c", 0)]


@settings(max_examples=80)
@given(workload=st.lists(st.tuples(st.sampled_from(((5, 6, 7, 8, 9, 10, 11, 12, 13), (30, 31, 32, 33, 34, 35, 36, 37))),
                                   st.lists(st.integers(1, VOCAB - 1), max_size=6)), min_size=2, max_size=8),
       host=st.sampled_from((2, 8)))
def test_same_tokens_with_host_prefix_cache(workload, host):
    """Requests one after another over shared stems on a small device pool:
    host-cache hits happen, and tokens equal a run without any cache."""
    config = attrs.evolve(cfg(num_blocks=12, host=host, mode="swap", caching=True), cache=CacheConfig(
        block_size=2, num_blocks=12, enable_prefix_caching=True, num_host_blocks=host))
    run, ref = Run(config), Run(REFERENCE)
    for i, (stem, tail) in enumerate(workload):
        r = req(f"r{i}", stem + tuple(tail), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        for x in (run, ref):
            assert x.add(r)
            x.drain(step_bound([r], config))
    assert run.tokens == ref.tokens


def test_swapping_a_row_planned_earlier_in_the_step_keeps_only_computed_kv():
    """Under priority, the victim may be a row already planned this step: it
    swaps out the KV it had before the step (its planned tokens are given back)."""
    config = attrs.evolve(cfg(num_blocks=5, host=8), scheduler=attrs.evolve(cfg().scheduler, policy="priority"))
    run = Run(config)
    run.add(attrs.evolve(req("lo", range(1, 10)), priority=5))  # 9 tokens: 3 blocks, row 0
    run.step()
    run.add(attrs.evolve(req("hi", range(20, 28)), priority=0))  # 8 tokens: 2 blocks, row 1
    run.step()  # lo decodes, hi is prefilled: the pool is full
    run.step()  # lo decodes inside its block (planned), then hi needs a block: lo is swapped out
    (seq,) = [s for s in run.state.waiting if s.request_id == "lo"]
    assert seq.status == SeqStatus.SWAPPED and seq.num_computed == 10 and len(seq.swapped) == 3
    assert "lo" not in run.plans[-1].request_ids
    run.drain(100)
    ref = Run(cfg(num_blocks=64, host=0, mode="recompute"))
    ref.add(req("lo", range(1, 10)))
    ref.add(req("hi", range(20, 28)))
    ref.drain(100)
    assert run.tokens == ref.tokens


def test_num_cached_tokens_and_prefix_cache_counters():
    """RequestOutput.num_cached_tokens counts prompt tokens from any cache
    tier; the state counts prefix-cache queries and hits in tokens."""
    from fnllm.engine import LLMEngine

    config = cfg(num_blocks=6, host=8, mode="recompute", caching=True)
    eng = LLMEngine(config, FakeExecutor(6, 4, VOCAB, EOS), clock=lambda: 0.0)
    sp = SamplingParams(temperature=0.0, max_tokens=1)

    def one(rid, prompt):
        eng.add_request(rid, list(prompt), sp)
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        return outs[-1]

    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    assert one("a", prompt).num_cached_tokens == 0
    assert one("b", prompt).num_cached_tokens == 12  # device tier
    assert (eng.state.prefix_cache_queries, eng.state.prefix_cache_hits) == (26, 12)
    one("filler", range(40, 60))  # evicts the prompt's blocks to the host tier
    assert eng.state.pool.host.hash_of
    out = one("c", prompt)
    assert out.num_cached_tokens == 12 and eng.last_plan.swap_in  # host tier
    assert eng.state.prefix_cache_hits == 24
    assert eng.state.num_preemptions == 0


def test_staged_disk_blocks_are_host_hits():
    """stage_blocks (the disk tier's reads) names prompt blocks in the host
    tier; admission swaps them in, and the invariants hold throughout."""
    from fnllm.invariants import check_invariants
    from fnllm.lifecycle import stage_blocks

    run = Run(cfg(num_blocks=8, host=4, mode="recompute", caching=True))
    prompt = list(range(1, 19))  # 4 full blocks + 2 tokens
    run.add(req("a", prompt))
    state, got = stage_blocks(run.state, "a", 0, 9)
    assert len(got) == 4  # the host tier has 4 blocks
    check_invariants(state, run.config)
    for j, h in enumerate(got):  # the device layer fills them (here: the fake's token KV)
        run.ex.host[h] = prompt[j * 4 : (j + 1) * 4]
    run.state = state
    run.step()
    plan = run.plans[-1]
    assert [h for h, _ in plan.swap_in] == list(got) and plan.positions[0] == 16
    run.drain(50)
    ref = Run(cfg(num_blocks=64, host=0, mode="recompute"))
    ref.add(req("a", prompt))
    ref.drain(50)
    assert run.tokens == ref.tokens
    again, none = stage_blocks(run.state, "gone", 0, 2)
    assert none == () and again is run.state
