"""The logits-processing SamplingParams in the pure core: validation at add
time, prompt truncation, the plan's ``history`` and ``prompt_targets``
columns, prompt_logprobs requests bypassing the prefix cache, trace round trip."""

from __future__ import annotations

import attrs
import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import Rejection, Request, SamplingParams
from fnllm.step import commit
from fnllm.trace import request_from_json, request_to_json

CONFIG = EngineConfig(
    model=ModelConfig(vocab_size=97, eos_token_ids=(0,), max_logprobs=5),
    cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=True),
    scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64),
)


@pytest.mark.parametrize("kwargs, name", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(logit_bias={"x": 1.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={3: float("inf")}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, "a"]), "allowed_token_ids"),
    (dict(bad_words=[" "]), "bad_words"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
])
def test_bad_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_logit_bias_accepts_openai_string_keys_and_is_hashable():
    sp = SamplingParams(logit_bias={"5": 1, 7: -2.5})
    assert dict(sp.logit_bias) == {5: 1.0, 7: -2.5}
    assert hash(sp) == hash(SamplingParams(logit_bias={5: 1.0, 7: -2.5}))


@pytest.mark.parametrize("kwargs, words", [
    (dict(logit_bias={97: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[1, 200]), "allowed_token_ids"),
    (dict(bad_words_token_ids=[[1, 97]]), "bad_words"),
    (dict(prompt_logprobs=6), "prompt_logprobs=6 exceeds max_logprobs=5"),
    (dict(truncate_prompt_tokens=65), "truncate_prompt_tokens=65 exceeds max_model_len=64"),
])
def test_add_time_checks_against_vocabulary_and_limits(kwargs, words):
    state = initial_state(CONFIG)
    out = add_request(state, Request(request_id="a", prompt_token_ids=(1, 2, 3), sampling=SamplingParams(**kwargs)),
                      CONFIG)
    assert isinstance(out, Rejection) and words in out.reason and not out.reason.startswith("prompt ")
    assert not state.requests  # nothing changed


def test_truncate_prompt_tokens_keeps_the_last_tokens():
    state = add_request(initial_state(CONFIG), Request(
        request_id="a", prompt_token_ids=tuple(range(1, 81)),
        sampling=SamplingParams(truncate_prompt_tokens=10, max_tokens=4)), CONFIG)  # 80 > max_model_len: cut first
    assert state.requests["a"].prompt_token_ids == tuple(range(71, 81))


def _run(state, ex, steps=100):
    plans = []
    for _ in range(steps):
        if not state.requests:
            break
        state, plan = schedule(state, CONFIG)
        plans.append(plan)
        state, _ = commit(state, plan, ex.execute(plan), CONFIG)
    return state, plans


def test_history_column_carries_prompt_and_output_for_penalized_rows():
    state = initial_state(CONFIG)
    pen = SamplingParams(repetition_penalty=1.2, max_tokens=5)
    state = add_request(state, Request(request_id="p", prompt_token_ids=(5, 6, 7), sampling=pen), CONFIG)
    state = add_request(state, Request(request_id="q", prompt_token_ids=(8, 9), sampling=SamplingParams(max_tokens=5)),
                        CONFIG)
    ex = FakeExecutor(64, 4, vocab_size=97)
    outputs: list[int] = []
    for _ in range(5):
        state, plan = schedule(state, CONFIG)
        row = plan.request_ids.index("p")
        assert plan.history[row] == ((5, 6, 7), tuple(outputs))
        assert plan.history[plan.request_ids.index("q")] == ()
        out = ex.execute(plan)
        outputs.append(out.sampled[row][0])
        state, _ = commit(state, plan, out, CONFIG)
    # frequency penalty alone: no prompt in the history; no penalty: no column at all
    only_freq = SamplingParams(frequency_penalty=0.5)
    state = add_request(initial_state(CONFIG), Request(request_id="f", prompt_token_ids=(5, 6), sampling=only_freq),
                        CONFIG)
    assert schedule(state, CONFIG)[1].history == (((), ()),)
    state = add_request(initial_state(CONFIG), Request(request_id="n", prompt_token_ids=(5, 6)), CONFIG)
    assert schedule(state, CONFIG)[1].history == ()


def test_prompt_targets_cover_the_prompt_across_chunks_and_skip_the_cache():
    prompt = tuple(range(10, 30))  # 20 tokens, chunks of 8
    ex = FakeExecutor(64, 4, vocab_size=97)
    state = add_request(initial_state(CONFIG), Request(request_id="warm", prompt_token_ids=prompt,
                                                       sampling=SamplingParams(max_tokens=2)), CONFIG)
    state, _ = _run(state, ex)  # the prompt's blocks are now cached
    sp = SamplingParams(max_tokens=2, prompt_logprobs=1)
    state = add_request(state, Request(request_id="a", prompt_token_ids=prompt, sampling=sp), CONFIG)
    state, plans = _run(state, ex)
    rows = [(p.positions[0], p.prompt_targets[0]) for p in plans if p.prompt_targets]
    assert rows[0][0] == 0  # no cached prefix read
    assert sum((t for _, t in rows), ()) == prompt[1:]
    assert all(t == prompt[pos + 1 : pos + 1 + len(t)] for pos, t in rows)
    # without prompt_logprobs the same prompt starts at its cached prefix
    state = add_request(state, Request(request_id="b", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=2)),
                        CONFIG)
    assert schedule(state, CONFIG)[1].positions[0] == 16


def test_trace_round_trip_keeps_processing_params():
    sp = SamplingParams(logit_bias={3: 1.5}, allowed_token_ids=[1, 2, 3], bad_words=["x"],
                        bad_words_token_ids=[[4, 5]], repetition_penalty=1.1, presence_penalty=0.5,
                        frequency_penalty=-0.5, prompt_logprobs=2, truncate_prompt_tokens=4)
    import json

    req = Request(request_id="a", prompt_token_ids=(1, 2), sampling=sp)
    back = request_from_json(json.loads(json.dumps(request_to_json(req))))
    assert back.sampling == sp and back.sampling.needs_history
    assert attrs.evolve(sp, bad_words_token_ids=()).needs_history  # penalties alone


def test_output_ids_read_compare_and_pickle_as_a_tuple():
    import pickle

    from fnllm.state import OutputIds, cons_push_all

    cell = cons_push_all(None, [4, 5, 6])
    out = OutputIds(cell, 3)
    assert out.tokens() == (4, 5, 6) and out.last(2) == (5, 6) and len(out) == 3 and list(out) == [4, 5, 6]
    assert out == (4, 5, 6) and out == OutputIds.of([4, 5, 6]) and repr(out) == "(4, 5, 6)"
    back = pickle.loads(pickle.dumps(out))
    assert back == out and back.cell == cell
