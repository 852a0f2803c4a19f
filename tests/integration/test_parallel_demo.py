"""The real demo model (SmolLM2-135M: 9 query heads, 3 KV heads) split over
TP=3 worker processes (mp backend, gloo): the same greedy tokens as TP=1 on a
handful of chat prompts, through ``LLM`` with a small token budget (prompts
are prefilled in chunks) and a small KV cache (sequences are preempted and
recomputed). The GGUF weights are sliced at load (row ranges of q/k/v,
gate/up, the embedding; column ranges of o and down)."""

from __future__ import annotations

import pytest

from fnllm.llm import LLM
from fnllm.state import SamplingParams
from parallel_support import wait_gone

QUESTIONS = ["What is the capital of France?", "Name a color.", "Say hello."]
# prompts of 33-37 tokens take 5 blocks of 8: two fit in 10 blocks, and growing past 40 tokens preempts one
SETTINGS = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=10, max_num_batched_tokens=24,
                max_num_seqs=4, max_model_len=128, enable_prefix_caching=False)
NEW_TOKENS = 8


def run(llm: LLM, prompts) -> tuple[dict, int, bool]:
    """Greedy tokens per request, the number of chunked prefill rows, whether a sequence was preempted."""
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, sp)
    done, seen, chunks, preempted = {}, {}, 0, False
    while engine.has_unfinished_requests():
        outs = engine.step()
        plan = engine.last_plan
        for rid, pos, toks, n in zip(plan.request_ids, plan.positions, plan.token_ids, plan.num_samples):
            preempted |= pos < seen.get(rid, 0)  # computed again from an earlier position: recomputed
            seen[rid] = pos + len(toks)
            chunks += n == 0 and len(toks) > 1
        done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
    return done, chunks, preempted


@pytest.mark.slow
def test_tp3_equals_tp1_with_chunks_and_preemption(smollm2_path):
    with LLM(str(smollm2_path), **SETTINGS) as llm:
        assert type(llm.llm_engine.executor).__name__ == "UniProcExecutor"
        tok = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": tok.apply_chat_template_ids([{"role": "user", "content": q}])} for q in QUESTIONS]
        want, chunks, preempted = run(llm, prompts)
    assert chunks > 0 and preempted, "the settings must exercise chunked prefill and preemption"
    with LLM(str(smollm2_path), tensor_parallel_size=3, **SETTINGS) as llm:
        assert llm.llm_engine.executor.world_size == 3
        stats = llm.llm_engine.executor.worker_stats()
        got, chunks3, preempted3 = run(llm, prompts)
    assert wait_gone([s["pid"] for s in stats]) == []  # the context manager stopped every worker
    assert got == want
    assert chunks3 == chunks and preempted3
    assert [s["kv_heads"] for s in stats] == [1, 1, 1] and [s["heads"] for s in stats] == [3, 3, 3]
