"""Speculative decoding's Prometheus counters (vLLM's names) follow the
engine's acceptance counters, driven by the stand-in device."""

from __future__ import annotations

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.server.metrics import ServerMetrics
from fnllm.state import SamplingParams
from tests.server.server_support import metric_values


def test_spec_decode_counters_match_the_engine():
    config = EngineConfig(
        model=ModelConfig(vocab_size=5, eos_token_ids=(0,)), cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128),
        speculative={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
    )
    engine = LLMEngine(config, FakeExecutor(64, 4, vocab_size=5, cycle=2))
    metrics = ServerMetrics("fake")
    names = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
             "vllm:spec_decode_num_accepted_tokens_total")
    assert all(metric_values(metrics.render().decode())[n] == 0 for n in names)
    for k in range(3):
        engine.add_request(f"r{k}", [1, 2, 3, 4] * 3, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    per_request = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            per_request[out.request_id] = (out.num_draft_tokens, out.num_accepted_tokens)
        metrics.on_step(engine.state, 0, 0)
    values = metric_values(metrics.render().decode())
    stats = engine.spec_decode_stats()
    assert values[names[0]] == stats["num_drafts"] > 0
    assert values[names[1]] == stats["num_draft_tokens"] == sum(d for d, _ in per_request.values())
    assert values[names[2]] == stats["num_accepted_tokens"] == sum(a for _, a in per_request.values()) > 0
    assert stats["acceptance_rate"] == stats["num_accepted_tokens"] / stats["num_draft_tokens"]
