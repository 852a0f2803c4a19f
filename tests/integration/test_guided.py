"""Structured outputs (xgrammar) with the real demo model: a nested JSON schema
with enums, a date regex and a choice always give output that parses and
matches; the grammar state is exact across preemption and n > 1 forks; bad
guided params are clear errors that disturb nothing."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from fnllm.config import CacheConfig, EngineConfig, SchedulerConfig
from fnllm.engine import LLMEngine
from fnllm.state import GuidedDecodingParams, SamplingParams

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "address"],
    "additionalProperties": False,
}
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ["positive", "negative", "neutral"]
PERSON = "Describe a user of our web site as JSON."


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm


def _chat(llm, text: str) -> dict:
    tok = llm.get_tokenizer()
    return {"prompt_token_ids": tok.apply_chat_template_ids([{"role": "user", "content": text}])}


def _check_json(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_schema_regex_choice_always_match(llm):
    """Greedy and sampled (n=2) requests of each kind in one batch: every output ends by EOS and matches."""
    reqs = [
        ("json", _chat(llm, PERSON), GuidedDecodingParams(json=SCHEMA), 0.0, 1),
        ("json", _chat(llm, PERSON), GuidedDecodingParams(json=json.dumps(SCHEMA)), 1.0, 2),
        ("date", _chat(llm, "When did the first moon landing happen? Give the date."), GuidedDecodingParams(regex=DATE), 1.0, 2),
        ("choice", _chat(llm, "Is 'I love this movie' positive or negative?"), GuidedDecodingParams(choice=CHOICES), 0.0, 1),
        ("choice", _chat(llm, "Classify: 'the food was cold'"), GuidedDecodingParams(choice=CHOICES), 1.2, 2),
    ]
    engine = llm.llm_engine
    for k, (_, prompt, g, temp, n) in enumerate(reqs):
        engine.add_request(f"g{k}", prompt, SamplingParams(temperature=temp, n=n, seed=7 + k, max_tokens=90,
                                                           guided_decoding=g))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    for k, (kind, _, _, _, n) in enumerate(reqs):
        outs = done[f"g{k}"].outputs
        assert len(outs) == n
        for c in outs:
            assert c.finish_reason == "stop", (kind, c.text)
            if kind == "json":
                _check_json(c.text)
            elif kind == "date":
                assert re.fullmatch(DATE, c.text), c.text
            else:
                assert c.text in CHOICES


def _engine(llm, num_blocks: int) -> LLMEngine:
    base = llm.llm_engine.config
    config = EngineConfig(
        model=base.model,
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=1024),
    )
    return LLMEngine(config, llm.llm_engine.executor, llm.get_tokenizer())


def _run(engine: LLMEngine, prompts, params) -> dict:
    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"p{k}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
    return done


@pytest.mark.slow
def test_grammar_state_survives_preemption_and_forks(llm):
    """Seeded n=2 JSON requests in a cramped pool (preempted, recomputed, their
    grammar state rebuilt) give the same tokens as in a roomy pool."""
    prompts = [_chat(llm, f"{PERSON} Number {k}.") for k in range(3)]
    g = GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, n=2, seed=100 + k, max_tokens=60, guided_decoding=g) for k in range(3)]
    roomy = _run(_engine(llm, 256), prompts, params)
    cramped_engine = _engine(llm, 20)
    cramped = _run(cramped_engine, prompts, params)
    assert cramped_engine.state.num_preemptions > 0
    assert cramped == roomy
    tok = llm.get_tokenizer()
    for outs in roomy.values():
        for ids in outs:
            _check_json(tok.decode(ids))


def test_bad_guided_params_are_clear_errors(llm):
    with pytest.raises(ValueError, match="exactly one of json, regex"):
        GuidedDecodingParams(json=SCHEMA, regex=DATE)
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="choice"):
        GuidedDecodingParams(choice=[])
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex=DATE, backend="outlines")
    engine = llm.llm_engine
    before = engine.state
    for g, what in [
        (GuidedDecodingParams(regex="(unclosed"), "regex is invalid"),
        (GuidedDecodingParams(json="{not json"), "json is invalid"),
        (GuidedDecodingParams(json={"type": "nonsense"}), "json is invalid"),
        (GuidedDecodingParams(grammar="root ::= missing_rule"), "grammar is invalid"),
    ]:
        with pytest.raises(ValueError, match=what):
            engine.add_request("bad", [1, 2, 3], SamplingParams(guided_decoding=g))
    assert engine.state is before and not engine.has_unfinished_requests()


def test_device_matchers_follow_the_plan(llm):
    """GuidedRows: incremental, rebuilt (another history, a retried step, an unknown
    sequence) and padded-vocabulary masks all equal a fresh matcher's."""
    import torch

    from fnllm.device.guided import GuidedRows
    from fnllm.guided import grammar_compiler
    from fnllm.state import BatchPlan, OutputIds

    tok = llm.get_tokenizer()
    width = llm.llm_engine.config.model.vocab_size + 64  # logits wider than the tokenizer: padding ids
    compiler = grammar_compiler(tok, width)
    g = GuidedDecodingParams(regex=DATE)
    sp = SamplingParams(guided_decoding=g)
    rows = GuidedRows(compiler)

    def mask(seq_id: int, ids) -> torch.Tensor:
        logits = torch.zeros(2, width)
        plan = BatchPlan(step=0, seq_ids=(99, seq_id), sampling=(SamplingParams(), sp),
                         guided_outputs=(None, OutputIds.of(ids)))
        rows.apply(plan, [0, 1], logits)
        assert torch.equal(logits[0], torch.zeros(width))  # the unguided row is untouched
        return torch.isfinite(logits[1])

    def fresh(ids) -> torch.Tensor:
        return mask(1000 + len(ids) + 10 * sum(ids) % 997, ids)

    date = tok.encode("2021-07-14", add_special_tokens=False)
    other = tok.encode("1999-12-3", add_special_tokens=False)
    for n in range(len(date) + 1):  # seq 1 steps along the date, one token a step
        got = mask(1, date[:n])
        assert torch.equal(got, fresh(date[:n]))
        assert not got[llm.llm_engine.config.model.vocab_size:].any()  # padding never allowed
    assert torch.equal(mask(1, date), fresh(date))  # the same step again
    assert torch.equal(mask(1, other), fresh(other))  # another history (e.g. after a repair)
    done = mask(1, date)  # complete: only stop tokens remain
    assert set(done.nonzero().flatten().tolist()) <= set(tok.eos_token_ids)
    eos_only = mask(1, date + [tok.eos_token_ids[0]])  # after EOS (ignore_eos): EOS forced
    assert set(eos_only.nonzero().flatten().tolist()) == set(tok.eos_token_ids)
