"""The core's metric counters: preemptions and prefix-cache lookups (in tokens)."""

from __future__ import annotations

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Request, SamplingParams
from fnllm.step import commit

SP = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _config(num_blocks: int, caching: bool = True) -> EngineConfig:
    return EngineConfig(model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
                        cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching),
                        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64))


def _drain(state, config, ex=None):
    ex = ex or FakeExecutor(config.cache.num_blocks, 4, vocab_size=97)
    while state.requests:
        state, plan = schedule(state, config, now=0.0)
        state, _ = commit(state, plan, ex.execute(plan), config)
    return state


def test_preemptions_are_counted():
    config = _config(num_blocks=7)  # two 8-token prompts growing by 12 tokens cannot both stay
    state = initial_state(config)
    for rid, start in (("a", 1), ("b", 20)):
        state = add_request(state, Request(request_id=rid, prompt_token_ids=range(start, start + 8), sampling=SP), config)
    assert state.num_preemptions == 0
    assert _drain(state, config).num_preemptions > 0


def test_prefix_cache_queries_and_hits_count_tokens():
    config = _config(num_blocks=64)
    state = initial_state(config)
    prompt = tuple(range(1, 14))  # 13 tokens: 3 full blocks
    state = add_request(state, Request(request_id="a", prompt_token_ids=prompt, sampling=SP), config)
    ex = FakeExecutor(64, 4, vocab_size=97)  # one device: the cached blocks hold real KV
    state = _drain(state, config, ex)
    assert (state.prefix_cache_queries, state.prefix_cache_hits) == (13, 0)
    state = add_request(state, Request(request_id="b", prompt_token_ids=prompt, sampling=SP), config)
    state = _drain(state, config, ex)
    assert (state.prefix_cache_queries, state.prefix_cache_hits) == (26, 12)


def test_no_queries_without_prefix_caching():
    config = _config(num_blocks=64, caching=False)
    state = add_request(initial_state(config), Request(request_id="a", prompt_token_ids=range(1, 14), sampling=SP), config)
    state = _drain(state, config)
    assert (state.prefix_cache_queries, state.prefix_cache_hits) == (0, 0)
