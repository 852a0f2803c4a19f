"""The simulator drives the engine's own schedule and commit: its plans are
exactly the plans of the pure core (and of LLMEngine with the fake device)
run on the same inputs at the same steps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.invariants import check_invariants
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.sim.cost import CostModel
from fnllm.sim.executor import filler_token
from fnllm.sim.loop import _request_params, simulate
from fnllm.sim.workload import WorkItem, prompt_ids
from fnllm.state import Rejection, Request, StepOutput
from fnllm.step import commit
from tests.property.strategies import STEMS, engine_configs

COST = CostModel(coefficients={"step": 0.01, "token": 0.002, "decode_attn": 1e-5, "prefill_attn": 1e-6})


class FillerFake(FakeExecutor):
    """The fake device (it checks every KV read against its block tables)
    sampling the simulator's token: the same token source as SimExecutor."""

    def __init__(self, config):
        super().__init__(config.cache.num_blocks, config.cache.block_size, config.model.vocab_size,
                         sliding_window=config.cache.sliding_window)
        self.filler = filler_token(config.model.vocab_size, config.model.eos_token_ids)

    def _token(self, context, sp, index, out_pos):
        return self.filler


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 8))
    items, t = [], 0.0
    for i in range(n):
        t += draw(st.sampled_from((0.0, 0.005, 0.02, 0.1, 1.0)))
        shared = draw(st.booleans())
        ids = None
        if shared:  # a shared stem: prefix-cache hits
            stem = draw(st.sampled_from(STEMS))
            ids = stem + tuple(draw(st.lists(st.integers(1, 96), max_size=6)))
        plen = len(ids) if ids else draw(st.integers(1, 40))
        items.append(WorkItem(request_id=f"r{i}", arrival=t, prompt_len=plen, output_len=draw(st.integers(1, 10)),
                              prompt_token_ids=ids))
    return items


def core_reference(work, config, res):
    """The pure core by hand: adds at the steps the simulator added them,
    schedule / fake device / commit, and preemptions counted from the states."""
    state, ex, plans, preempt = initial_state(config), FillerFake(config), [], 0
    avoid = frozenset(config.model.eos_token_ids)
    adds = sorted(((res.add_steps[it.request_id], k, it) for k, it in enumerate(work) if it.request_id in res.add_steps),
                  key=lambda x: (x[0], x[1]))
    j = 0
    for _ in range(res.steps):
        while j < len(adds) and adds[j][0] <= state.step:
            _, k, it = adds[j]
            req = Request(request_id=it.request_id, prompt_token_ids=prompt_ids(it, k, config.model.vocab_size, avoid),
                          sampling=_request_params(it))
            out = add_request(state, req, config)
            assert not isinstance(out, Rejection)
            state, j = out, j + 1
        was = set(state.running.seq_ids)
        mid, plan = schedule(state, config)
        preempt += sum(1 for s in mid.waiting if s.seq_id in was)
        state, _ = commit(mid, plan, ex.execute(plan) if plan.has_device_work else StepOutput(), config)
        check_invariants(state, config)
        plans.append(plan)
    assert not state.requests
    return plans, preempt


def structure(plan):
    return (plan.step, plan.seq_ids, plan.positions, tuple(map(len, plan.token_ids)), plan.block_tables, plan.num_samples, plan.copies)


@settings(max_examples=60)
@given(config=engine_configs(), work=workloads())
def test_simulator_plans_are_the_cores_plans(config, work):
    res = simulate(work, config, COST, keep_plans=True)
    assert set(res.finish) | set(res.rejected) == {it.request_id for it in work}
    for it in work:
        if it.request_id in res.finish:
            assert res.output_len[it.request_id] == it.output_len  # each request ends at its recorded length
            assert res.arrival[it.request_id] <= res.first_token[it.request_id] <= res.finish[it.request_id]
    ref, preempt = core_reference(work, config, res)
    assert res.plans == ref  # identical plans, sampling parameters and token ids included
    assert res.preemptions == preempt


@settings(max_examples=25)
@given(config=engine_configs(), work=workloads())
def test_engine_with_the_fake_device_schedules_as_the_simulator(config, work):
    """LLMEngine with the ordinary fake device (its own tokens) and the same
    adds: the same plan structure (tokens differ; no prompt shares a block
    with generated text, so the cache behaves the same)."""
    res = simulate(work, config, COST, keep_plans=True)
    engine = LLMEngine(config, FakeExecutor(config.cache.num_blocks, config.cache.block_size, config.model.vocab_size,
                                            sliding_window=config.cache.sliding_window),
                       clock=lambda: 0.0)
    avoid = frozenset(config.model.eos_token_ids)
    adds = sorted(((res.add_steps[it.request_id], k, it) for k, it in enumerate(work) if it.request_id in res.add_steps),
                  key=lambda x: (x[0], x[1]))
    j, plans = 0, []
    for _ in range(res.steps):
        while j < len(adds) and adds[j][0] <= engine.state.step:
            _, k, it = adds[j]
            engine.add_request(it.request_id, list(prompt_ids(it, k, config.model.vocab_size, avoid)), _request_params(it))
            j += 1
        engine.step()
        plans.append(engine.last_plan)
    assert not engine.has_unfinished_requests()
    assert [structure(p) for p in plans] == [structure(p) for p in res.plans]
