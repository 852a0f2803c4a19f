"""RequestOutputKind (vLLM's): CUMULATIVE, DELTA and FINAL_ONLY report the
same tokens, in different pieces, through LLMEngine.step."""

from __future__ import annotations

import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.state import RequestOutputKind, SamplingParams

VOCAB, EOS = 50, (1,)


def _engine() -> LLMEngine:
    cfg = EngineConfig(
        model=ModelConfig(vocab_size=VOCAB, eos_token_ids=EOS),
        cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64),
    )
    return LLMEngine(cfg, FakeExecutor(64, 4, VOCAB, EOS, 0), clock=lambda: 0.0)


def _run(kind: RequestOutputKind) -> list:
    eng = _engine()
    for k in range(3):
        sp = SamplingParams(n=2 if k == 1 else 1, max_tokens=5 + k, ignore_eos=True, output_kind=kind, seed=k)
        eng.add_request(f"r{k}", {"prompt_token_ids": [3 + k, 4, 5, 6, 7]}, sp)
    steps = []
    while eng.has_unfinished_requests():
        steps.append(eng.step())
    return steps


def _final_tokens(steps) -> dict:
    return {(o.request_id, c.index): c.token_ids for outs in steps for o in outs if o.finished for c in o.outputs}


def test_kinds_report_the_same_tokens():
    cum, delta, final = (_run(k) for k in RequestOutputKind)
    want = _final_tokens(cum)
    assert len(want) == 4 and all(len(v) >= 5 for v in want.values())
    # FINAL_ONLY: one output per request, finished, with everything
    outs = [o for s in final for o in s]
    assert all(o.finished for o in outs) and len(outs) == 3
    assert _final_tokens(final) == want
    # DELTA: the pieces concatenate to the whole, and no piece repeats a token
    joined: dict = {}
    for s in delta:
        for o in s:
            for c in o.outputs:
                joined.setdefault((o.request_id, c.index), []).extend(c.token_ids)
    assert joined == want
    # CUMULATIVE: every step reports the whole output so far
    assert sum(len(s) for s in cum) > 3


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=7)
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
