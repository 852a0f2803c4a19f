"""A step mixing rows that asked for logprobs with rows that did not: the
device returns ``()`` for the latter, and each sampled token keeps its own
logprobs (the all-decode fast path and the general path alike)."""

from __future__ import annotations

from fnllm.config import CacheConfig, EngineConfig, ModelConfig
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Request, SamplingParams, StepOutput
from fnllm.step import commit


def test_mixed_logprob_rows_commit_aligned():
    cfg = EngineConfig(model=ModelConfig(vocab_size=10), cache=CacheConfig(block_size=4, num_blocks=20))
    st = initial_state(cfg)
    for rid, lp in (("a", 1), ("b", None), ("c", 0)):
        st = add_request(st, Request(request_id=rid, prompt_token_ids=(1, 2), sampling=SamplingParams(max_tokens=3, logprobs=lp)), cfg)
    seen = []
    for step in range(3):
        st, plan = schedule(st, cfg)
        lps = tuple((((5, -0.5 - step), (5, -0.5 - step)),) if sp.logprobs is not None else () for sp in plan.sampling)
        st, news = commit(st, plan, StepOutput(sampled=((5,),) * len(plan), logprobs=lps), cfg)
        seen.extend((o.request_id, o.logprobs) for o in news)
    assert len(seen) == 9
    for rid, lp in seen:
        assert (lp is None) == (rid == "b")
