"""The official ``openai`` client against a live ``fnllm serve`` (demo model):
greedy text equal to ``LLM.generate``'s, streaming equal to non-streaming,
usage counts, ``n`` with a seed, ``stop``, logprobs, and errors."""

from __future__ import annotations

import openai
import pytest

from fnllm.state import SamplingParams
from tests.server.server_support import SERVE_ARGS

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def offline():
    """``LLM`` in this process with the server's settings."""
    from fnllm.llm import LLM

    kv = SERVE_ARGS[SERVE_ARGS.index("--num-kv-blocks") + 1]
    return LLM(dtype="float32", device="cpu", num_kv_blocks=int(kv), max_model_len=512)


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, usage


def test_completions_greedy_equal_llm_generate(client, offline):
    want = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    res = client.completions.create(model="demo", prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == [w.outputs[0].text for w in want]
    assert res.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert res.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    for p, w in zip(PROMPTS, want):  # streamed, one prompt at a time: the same text
        stream = client.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        texts, reasons, usage = _stream_text(stream)
        assert texts == {0: w.outputs[0].text} and reasons == {0: w.outputs[0].finish_reason}
        assert usage.completion_tokens == len(w.outputs[0].token_ids)


def test_chat_greedy_equal_llm_chat(client, offline):
    want = offline.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    res = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    assert res.choices[0].message.content == want.outputs[0].text
    assert "Paris" in res.choices[0].message.content
    assert res.choices[0].message.role == "assistant"
    assert res.usage.prompt_tokens == len(want.prompt_token_ids)
    assert res.usage.completion_tokens == len(want.outputs[0].token_ids)
    stream = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: want.outputs[0].text} and reasons == {0: res.choices[0].finish_reason}
    assert usage.prompt_tokens == res.usage.prompt_tokens and usage.completion_tokens == res.usage.completion_tokens


def test_n2_with_seed_is_reproducible(client):
    kw = dict(model="demo", prompt="My favourite food is", max_tokens=12, temperature=1.0, seed=1234, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 24 or all(c.finish_reason == "stop" for c in a.choices if len(c.text) < 12)
    texts, reasons, _ = _stream_text(client.completions.create(**kw, stream=True))
    assert texts == {c.index: c.text for c in a.choices}


def test_stop_string_matches_offline(client, offline):
    sp = SamplingParams(temperature=0.0, max_tokens=32, stop=["."])
    want = offline.chat(QUESTION, sp, use_tqdm=False)[0].outputs[0]
    res = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=32, temperature=0, stop=["."])
    assert res.choices[0].finish_reason == "stop" and "." not in res.choices[0].message.content
    assert res.choices[0].message.content == want.text
    texts, reasons, _ = _stream_text(client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=32, temperature=0, stop=["."], stream=True))
    assert texts == {0: want.text} and reasons == {0: "stop"}


def test_logprobs(client):
    res = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the top token


def test_models_and_errors(client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="hello " * 600, max_tokens=2)
    assert e.value.body["param"] == "prompt" and "max_model_len" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=2, echo=True)
    assert e.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=[1, 2, 10**9], max_tokens=2)
    assert "vocabulary" in e.value.body["message"]


def test_penalties_and_vllm_extras_match_offline(client, offline):
    tok = offline.get_tokenizer()
    the = tok.encode(" the", add_special_tokens=False)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=16, frequency_penalty=1.0, presence_penalty=0.5,
                        repetition_penalty=1.3, logit_bias={the: -100.0}, bad_words=["Paris"], prompt_logprobs=1,
                        truncate_prompt_tokens=4)
    want = offline.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    res = client.completions.create(
        model="demo", prompt=PROMPTS[0], max_tokens=16, temperature=0, frequency_penalty=1.0, presence_penalty=0.5,
        logit_bias={str(the): -300},  # clamped to -100, as OpenAI and vLLM do
        extra_body={"repetition_penalty": 1.3, "bad_words": ["Paris"], "prompt_logprobs": 1,
                    "truncate_prompt_tokens": 4})
    choice = res.choices[0]
    assert choice.text == want.outputs[0].text and "Paris" not in choice.text
    assert res.usage.prompt_tokens == 4 == len(want.prompt_token_ids)
    plp = choice.model_extra["prompt_logprobs"]
    assert len(plp) == 4 and plp[0] is None
    for pos, entry in enumerate(plp[1:], 1):
        tid = want.prompt_token_ids[pos]
        got = entry[str(tid)]
        assert got["logprob"] == pytest.approx(want.prompt_logprobs[pos][tid], abs=1e-4)
        assert got["rank"] == want.prompt_logprob_ranks[pos] and got["decoded_token"] == tok.decode([tid])
        assert any(e["rank"] == 1 for e in entry.values())
    chat = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=12, temperature=0,
                                          extra_body={"bad_words": ["Paris"], "prompt_logprobs": 0})
    assert "Paris" not in chat.choices[0].message.content
    plp = chat.model_extra["prompt_logprobs"]
    assert len(plp) == chat.usage.prompt_tokens and plp[0] is None and all(len(e) == 1 for e in plp[1:])


@pytest.mark.parametrize("kwargs, param", [
    (dict(logit_bias={"999999": 1}), "logit_bias"),
    (dict(logit_bias={"a": 1}), "logit_bias"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(extra_body={"allowed_token_ids": [5, 10**6]}), "allowed_token_ids"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"prompt_logprobs": 1}, stream=True), "prompt_logprobs"),
    (dict(extra_body={"truncate_prompt_tokens": 10**4}), "truncate_prompt_tokens"),
])
def test_penalty_errors_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=2, **kwargs)
    assert e.value.status_code == 400 and param in (e.value.body["param"] or e.value.body["message"])
