"""Logits processing and prompt logprobs on a real model: each penalty
against a plain reference computation, greedy decoding with every parameter
against the transformers model plus that reference, seeded batch
invariance, prompt_logprobs against a full-forward log-softmax (chunked
prefill, one chunk, prefix cache), truncation, and exact replay."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.executor import ModelExecutor
from fnllm.device.penalties import apply_processing
from fnllm.device.sampling import SampleRequest, sample
from fnllm.engine import LLMEngine
from fnllm.state import SamplingParams
from integration_support import reference_logits, tokens

VOCAB = 256


def reference_process(logits: list[float], sp: SamplingParams, prompt, output) -> list[float]:
    """vLLM's order and semantics, token by token in plain Python."""
    x = list(logits)
    if sp.allowed_token_ids is not None:
        x = [v if t in sp.allowed_token_ids else -math.inf for t, v in enumerate(x)]
    for w in sp.bad_words_token_ids:
        if len(w) - 1 <= len(output) and list(output[len(output) - len(w) + 1:]) == list(w[:-1]) or len(w) == 1:
            x[w[-1]] = -math.inf
    for t, b in sp.logit_bias.items():
        x[t] += b
    counts = Counter(output)
    for t in set(prompt) | set(output):
        x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
    for t, k in counts.items():
        x[t] -= sp.frequency_penalty * k + sp.presence_penalty
    return x


CASES = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(frequency_penalty=1.5),
    SamplingParams(presence_penalty=-1.2),
    SamplingParams(logit_bias={3: 5.0, 40: -100.0, 41: 0.5}),
    SamplingParams(allowed_token_ids=[7, 9, 11, 200]),
    SamplingParams(bad_words_token_ids=[[5], [6, 7], [8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8]]),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={12: 2.0},
                   bad_words_token_ids=[[6, 7]], allowed_token_ids=list(range(3, 120))),
]


@pytest.mark.parametrize("sp", CASES, ids=lambda sp: ",".join(f for f in (
    "rep" * (sp.repetition_penalty != 1), "freq" * bool(sp.frequency_penalty), "pres" * bool(sp.presence_penalty),
    "bias" * bool(sp.logit_bias), "allowed" * (sp.allowed_token_ids is not None),
    "bad" * bool(sp.bad_words_token_ids)) if f))
def test_processing_matches_reference(sp):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, VOCAB, generator=g) * 3
    prompt, output = (5, 5, 9, 30, 31, 250), (6, 7, 6, 12, 12, 12, 9, 8, 9)
    plain = SamplingParams()
    got = apply_processing(logits, [plain, sp, plain], [(), (prompt if sp.repetition_penalty != 1 else (), output), ()])
    want = reference_process(logits[1].tolist(), sp, prompt if sp.repetition_penalty != 1 else (), output)
    assert torch.allclose(got[1], torch.tensor(want), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])  # other rows untouched
    greedy = SamplingParams(temperature=0.0, **{k: getattr(sp, k) for k in (
        "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "allowed_token_ids",
        "bad_words_token_ids")})
    (tok,), = sample(logits[1:2], [SampleRequest(greedy, 1, 0, len(output), history=(prompt, output))])[0]
    assert tok == max(range(VOCAB), key=lambda t: want[t])


def test_seeded_penalized_row_is_batch_invariant():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, VOCAB, generator=g)
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=11, repetition_penalty=1.2, frequency_penalty=0.5,
                        logit_bias={4: 2.0})
    hist = ((1, 2, 3), (4, 4, 5))
    others = [SampleRequest(SamplingParams(temperature=1.0, seed=k, presence_penalty=1.0), 1, 0, 2, history=((), (k,)))
              for k in range(3)]
    for pos in range(20):
        me = SampleRequest(sp, 1, 0, pos, history=hist)
        alone = sample(logits[1:2], [me])[0][0]
        batched = sample(logits, [others[0], me, others[1], others[2]])[0][1]
        assert alone == batched


# -- the tiny Pangu through the engine -----------------------------------------------------------


@pytest.fixture(scope="module")
def executor(tiny_pangu):
    return ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=96, block_size=4, seed=7)


def engine(ex, *, budget=8, caching=True, recorder=None) -> LLMEngine:
    cfg = EngineConfig(
        model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(2,), seed=7),
        cache=CacheConfig(block_size=4, num_blocks=96, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, max_model_len=128),
    )
    return LLMEngine(cfg, ex, recorder=recorder)


def run(eng: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, prompt, sp in requests:
        eng.add_request(rid, prompt, sp)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_greedy_with_every_parameter_matches_reference(executor, tiny_pangu):
    model = tiny_pangu[1]
    prompt = tokens(13, 51)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                        frequency_penalty=0.3, presence_penalty=0.2, logit_bias={prompt[3]: 1.5, 17: 6.0},
                        bad_words_token_ids=[[prompt[-1], 9]])
    got = run(engine(executor), [("a", prompt, sp)])["a"].outputs[0].token_ids
    seq, out = list(prompt), []
    for _ in range(12):
        logits = reference_logits(model, seq)[-1].tolist()
        x = reference_process(logits, sp, prompt, out)
        t = max(range(VOCAB), key=lambda i: x[i])
        out.append(t)
        seq.append(t)
    assert got == out
    plain = run(engine(executor), [("b", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))])
    assert plain["b"].outputs[0].token_ids != got  # the parameters did something


def test_seeded_penalties_batch_invariant_through_the_engine(executor):
    sp = SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                        presence_penalty=0.5, bad_words_token_ids=[[40, 41]])
    p = tokens(11, 61)
    alone = run(engine(executor), [("x", p, sp)])["x"].outputs[0].token_ids
    others = [(f"o{k}", tokens(5 + 4 * k, 70 + k), SamplingParams(temperature=1.0, seed=k, max_tokens=7,
                                                                      frequency_penalty=0.8)) for k in range(3)]
    batched = run(engine(executor), [others[0], ("x", p, sp), *others[1:]])["x"].outputs[0].token_ids
    assert alone == batched


def _check_prompt_logprobs(out, prompt, ref, k):
    assert out.prompt_logprobs[0] is None and out.prompt_logprob_ranks[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[prompt[i]] - ref[i - 1, prompt[i]].item()) < 1e-4
        top = torch.topk(ref[i - 1], k).indices.tolist()
        assert set(top) <= set(entry) and len(entry) in (k, k + 1)
        assert out.prompt_logprob_ranks[i] == 1 + int((ref[i - 1] > ref[i - 1, prompt[i]] + 1e-5).sum())


def test_prompt_logprobs_chunked_unchunked_and_cached(executor, tiny_pangu):
    prompt = tokens(30, 81)
    ref = torch.log_softmax(reference_logits(tiny_pangu[1], prompt), -1)
    sp = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3)
    chunked = run(engine(executor, budget=8), [("c", prompt, sp)])["c"]
    whole = run(engine(executor, budget=64, caching=False), [("w", prompt, sp)])["w"]
    eng = engine(executor, budget=8)
    run(eng, [("warm", prompt, SamplingParams(max_tokens=2))])  # caches the prompt's blocks
    cached = run(eng, [("h", prompt, sp)])["h"]
    assert cached.num_cached_tokens == 0  # served without the cache (documented choice)
    for out in (chunked, whole, cached):
        _check_prompt_logprobs(out, prompt, ref, 3)
        assert out.outputs[0].token_ids == whole.outputs[0].token_ids
    for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-5 for t in a)
    # a request without prompt_logprobs still hits the cache afterwards
    assert run(eng, [("again", prompt, SamplingParams(max_tokens=2))])["again"].num_cached_tokens == 28


def test_truncate_prompt_tokens(executor):
    prompt = tokens(40, 91)
    sp = SamplingParams(temperature=0.0, max_tokens=4, truncate_prompt_tokens=9)
    out = run(engine(executor), [("t", prompt, sp)])["t"]
    assert out.prompt_token_ids == prompt[-9:]
    same = run(engine(executor), [("u", prompt[-9:], SamplingParams(temperature=0.0, max_tokens=4))])["u"]
    assert out.outputs[0].token_ids == same.outputs[0].token_ids


def test_replay_is_exact_with_penalties_and_prompt_logprobs(executor, tmp_path):
    from fnllm.replay import verify, verify_device
    from fnllm.trace import TraceWriter, read_trace

    path = str(tmp_path / "run.trace")
    rec = TraceWriter(path)
    reqs = [("a", tokens(17, 3), SamplingParams(temperature=0.7, seed=3, max_tokens=6, repetition_penalty=1.5,
                                               logit_bias={"9": 3.0}, prompt_logprobs=2)),
            ("b", tokens(9, 4), SamplingParams(temperature=0.0, max_tokens=6, frequency_penalty=1.0,
                                               bad_words_token_ids=[[5, 6]], allowed_token_ids=list(range(3, 90))))]
    run(engine(executor, recorder=rec), reqs)
    rec.close()
    trace = read_trace(path)
    assert any("prompt_logprobs" in e for e in trace.events if e["type"] == "step")
    assert verify(trace) is None
    assert verify_device(trace, executor) is None


def test_count_memo_extends_counts_and_matches_a_recount():
    from fnllm.device.penalties import CountMemo
    from fnllm.state import OutputIds

    memo, cell, toks = CountMemo(), None, []
    for t in (5, 9, 5, 7, 5, 200):
        cell, toks = (t, cell), toks + [t]
        got = memo.output_counts(OutputIds(cell, len(toks)), VOCAB, "cpu")
        assert torch.equal(got, torch.bincount(torch.tensor(toks), minlength=VOCAB).float())
        memo.end_step()
    fresh = CountMemo().output_counts(OutputIds(cell, len(toks)), VOCAB, "cpu")  # a miss recounts
    assert torch.equal(fresh, got)
