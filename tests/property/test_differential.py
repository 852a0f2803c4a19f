"""Differential: with the fake executor a token depends only on its prefix,
so the same workload must give the same tokens under any block size, budget,
chunk cap, prefix caching setting, pool size (forcing preemption) or policy."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.state import Request
from tests.property.invariants import Run, step_bound
from tests.property.strategies import EOS, VOCAB, engine_configs, prompts, sampling_params

REFERENCE = EngineConfig(
    model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(EOS,)),
    cache=CacheConfig(block_size=16, num_blocks=256, enable_prefix_caching=False),
    scheduler=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64, max_model_len=64),
)


def run_all(config: EngineConfig, requests: list[Request], eos_every: int):
    run = Run(config, eos_every=eos_every)
    for r in requests:
        # only n > max_num_seqs may be refused by these configs
        assert run.add(r) or r.sampling.n > config.scheduler.max_num_seqs, run.rejected
    run.drain(step_bound(requests, config))
    return run


workloads = st.lists(st.tuples(prompts(), sampling_params(), st.integers(0, 2)), min_size=1, max_size=6)


@given(workload=workloads, config=engine_configs(), eos_every=st.sampled_from((0, 7)))
def test_same_tokens_under_any_config(workload, config, eos_every):
    requests = [Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp, priority=pr) for i, (p, sp, pr) in enumerate(workload)]
    got = run_all(config, requests, eos_every)
    # the same window (a window changes the tokens; nothing else may)
    reference = attrs.evolve(REFERENCE, cache=attrs.evolve(REFERENCE.cache, sliding_window=config.cache.sliding_window))
    ref = run_all(reference, [r for r in requests if r.request_id not in got.rejected], eos_every)
    assert got.tokens == ref.tokens
    assert got.finish == ref.finish


@given(workload=workloads, eos_every=st.sampled_from((0, 7)))
def test_same_tokens_under_forced_preemption(workload, eos_every):
    """A pool just big enough for the largest request forces preemptions."""
    requests = [Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp) for i, (p, sp, _) in enumerate(workload)]
    need = max(len(r.prompt_token_ids) + r.sampling.max_tokens - 1 for r in requests)
    tight = attrs.evolve(REFERENCE, cache=CacheConfig(block_size=2, num_blocks=-(-need // 2), enable_prefix_caching=True))
    ref = run_all(REFERENCE, requests, eos_every)
    got = run_all(tight, requests, eos_every)
    assert got.tokens == ref.tokens
