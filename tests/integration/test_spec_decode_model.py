"""N-gram speculative decoding on the real demo model (SmolLM2-135M, float32):
a code-editing prompt that copies from itself, batched with other requests;
greedy, seeded sampled and logprob outputs equal those of the same engine
without speculation, and drafts are accepted."""

from __future__ import annotations

import attrs
import pytest

from fnllm import LLM, SamplingParams
from fnllm.engine import LLMEngine

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n"
PROMPTS = [
    [{"role": "user", "content": "Rename the parameters a to x and b to y. Output only the code.\n\n" + CODE}],
    [{"role": "user", "content": "Repeat exactly: red, green, blue, red, green, blue, red, green, blue."}],
]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with LLM(str(smollm2_path), num_kv_blocks=96, max_num_seqs=8, speculative_config=SPEC) as llm:
        yield llm


def _run(engine: LLMEngine, prompts, params):
    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(k), p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(k)] for k in range(len(prompts))]


@pytest.mark.slow
def test_outputs_identical_with_and_without_speculation(llm):
    tok = llm.get_tokenizer()
    ids = [{"prompt_token_ids": tok.apply_chat_template_ids(m)} for m in PROMPTS]
    prompts = ids + [ids[1], ids[0]]
    params = [SamplingParams(temperature=0.0, max_tokens=32)] * 2 + [
        SamplingParams(temperature=0.8, seed=7, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=2),
    ]
    engine = llm.llm_engine
    assert engine.config.speculative is not None
    got = _run(engine, prompts, params)
    plain = LLMEngine(attrs.evolve(engine.config, speculative=None), engine.executor, tok)
    ref = _run(plain, prompts, params)
    for g, r in zip(got, ref):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].text == r.outputs[0].text
        assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
        assert r.num_draft_tokens == 0
    for g_lp, r_lp in zip(got[3].outputs[0].logprobs, ref[3].outputs[0].logprobs):
        assert g_lp.keys() == r_lp.keys()
        assert all(abs(g_lp[t] - r_lp[t]) < 1e-3 for t in g_lp)
    code = got[0]
    assert code.num_accepted_tokens > 0 and code.num_draft_tokens >= code.num_accepted_tokens
    stats = engine.spec_decode_stats()
    assert stats["num_draft_tokens"] == sum(o.num_draft_tokens for o in got)
    assert stats["num_accepted_tokens"] == sum(o.num_accepted_tokens for o in got)
    assert 0 < stats["acceptance_rate"] <= 1
    assert not engine.state.requests and engine.state.pool.num_free == engine.state.pool.num_blocks


def test_bad_speculative_config_fails_before_loading(smollm2_path):
    with pytest.raises(ValueError, match="method must be one of"):
        LLM(str(smollm2_path), speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown key"):
        LLM(str(smollm2_path), speculative_config={"method": "ngram", "num_speculative_tokens": 2, "k": 1})
