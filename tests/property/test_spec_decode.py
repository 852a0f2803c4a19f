"""N-gram speculative decoding on the fake executor: outputs (greedy and
seeded sampled) are identical with and without speculation, whatever the
config, budget, pool size (preemption, swap), stop ids, EOS and max_tokens;
every transition keeps the invariants (20 included); replay stays exact.

A small vocabulary and the fake executor's ``window`` (the next token is a
function of the last two tokens only) make outputs cycle, so drafts are
proposed and accepted often, partly and wholly."""

from __future__ import annotations

import os
import tempfile

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.replay import verify, verify_device
from fnllm.spec import num_accepted, propose
from fnllm.state import Request, SamplingParams
from fnllm.trace import TraceWriter, read_trace
from tests.property.invariants import Run, step_bound
from tests.property.strategies import EOS, engine_configs

VOCAB = 5

REFERENCE = EngineConfig(
    model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(EOS,)),
    cache=CacheConfig(block_size=16, num_blocks=256, enable_prefix_caching=False),
    scheduler=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=64, max_model_len=64),
)


@st.composite
def spec_configs(draw) -> SpeculativeConfig:
    lo = draw(st.integers(1, 3))
    return SpeculativeConfig(num_speculative_tokens=draw(st.integers(1, 6)), prompt_lookup_min=lo,
                             prompt_lookup_max=draw(st.integers(lo, 4)))


@st.composite
def requests(draw) -> list[Request]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        unit = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=4))
        prompt = tuple((unit * 10)[: draw(st.integers(1, 24))])
        sp = SamplingParams(
            temperature=draw(st.sampled_from((0.0, 0.0, 1.0))), seed=draw(st.integers(0, 99)),
            max_tokens=draw(st.integers(2, 30)), min_tokens=draw(st.integers(0, 2)), ignore_eos=draw(st.booleans()),
            stop_token_ids=draw(st.lists(st.integers(1, VOCAB - 1), max_size=1)), n=draw(st.sampled_from((1, 1, 2))),
        )
        out.append(Request(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sp, priority=draw(st.integers(0, 1))))
    return out


def run_all(config: EngineConfig, reqs: list[Request], window: int, eos_every: int) -> Run:
    run = Run(config, eos_every=eos_every)
    run.ex = FakeExecutor(config.cache.num_blocks, config.cache.block_size, VOCAB, EOS, eos_every, cycle=window,
                          sliding_window=config.cache.sliding_window)
    for r in reqs:
        assert run.add(r) or r.sampling.n > config.scheduler.max_num_seqs, run.rejected
    run.drain(step_bound(reqs, config))
    return run


def _small_vocab(config: EngineConfig, spec: SpeculativeConfig | None) -> EngineConfig:
    return attrs.evolve(config, model=attrs.evolve(config.model, vocab_size=VOCAB), speculative=spec)


@settings(max_examples=60)
@given(reqs=requests(), config=engine_configs(), spec=spec_configs(), window=st.sampled_from((0, 2, 2)),
       eos_every=st.sampled_from((0, 0, 11)))
def test_same_tokens_with_and_without_speculation(reqs, config, spec, window, eos_every):
    got = run_all(_small_vocab(config, spec), reqs, window, eos_every)
    ref_config = attrs.evolve(REFERENCE, cache=attrs.evolve(REFERENCE.cache, sliding_window=config.cache.sliding_window))
    ref = run_all(ref_config, [r for r in reqs if r.request_id not in got.rejected], window, eos_every)
    assert got.tokens == ref.tokens
    assert got.finish == ref.finish
    s = got.state
    assert 0 <= s.spec_num_accepted_tokens <= s.spec_num_draft_tokens
    assert s.spec_num_drafts == sum(sum(1 for d in p.num_draft_tokens if d) for p in got.plans)
    assert s.spec_num_draft_tokens == sum(sum(p.num_draft_tokens) for p in got.plans)


@settings(max_examples=30)
@given(reqs=requests(), spec=spec_configs(), window=st.sampled_from((0, 2)))
def test_same_tokens_under_forced_preemption(reqs, spec, window):
    """A pool just big enough for the largest request: drafts compete for blocks with preemption."""
    need = max(len(r.prompt_token_ids) + r.sampling.max_tokens - 1 for r in reqs)
    for mode, host in (("recompute", 0), ("swap", 8)):
        tight = attrs.evolve(
            REFERENCE, speculative=spec,
            cache=CacheConfig(block_size=2, num_blocks=-(-need // 2), enable_prefix_caching=True, num_host_blocks=host),
            scheduler=attrs.evolve(REFERENCE.scheduler, preemption_mode=mode),
        )
        ref = run_all(REFERENCE, reqs, window, 0)
        got = run_all(tight, reqs, window, 0)
        assert got.tokens == ref.tokens


def test_speculation_accepts_on_a_cycling_workload():
    """Greedy outputs that cycle: most drafts are accepted, steps fall, tokens stay the same."""
    reqs = [Request(request_id=f"r{i}", prompt_token_ids=(1, 2, 3, 4) * 3,
                    sampling=SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)) for i in range(3)]
    spec = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2)
    base = attrs.evolve(REFERENCE, cache=CacheConfig(block_size=4, num_blocks=64))
    ref = run_all(base, reqs, 2, 0)
    got = run_all(attrs.evolve(base, speculative=spec), reqs, 2, 0)
    assert got.tokens == ref.tokens
    s = got.state
    assert s.spec_num_drafts > 0 and s.spec_num_accepted_tokens > s.spec_num_draft_tokens // 2
    assert len(got.plans) < len(ref.plans) // 2
    off = run_all(attrs.evolve(base, speculative=attrs.evolve(spec, disable_by_batch_size=3)), reqs, 2, 0)
    assert off.tokens == ref.tokens and off.state.spec_num_drafts == 0
    some = run_all(attrs.evolve(base, speculative=attrs.evolve(spec, disable_by_batch_size=4)), reqs, 2, 0)
    assert some.state.spec_num_drafts > 0


def test_propose_most_recent_longest_match():
    assert propose((1, 2, 3, 9, 1, 2, 3, 7, 5, 3), 2, 3, 1) == (7, 5)  # "3" last seen before 7
    assert propose((1, 2, 3, 9, 1, 2, 3, 7, 2, 3), 2, 3, 1) == (7, 2)  # longest: "2 3" most recently before 7
    assert propose((1, 2, 3, 4), 3, 2, 1) == ()
    assert propose((5, 5, 5, 5), 3, 2, 2) == (5,)
    assert propose((256, 1, 256), 2, 1, 1) == (1, 256)  # not fooled by byte-misaligned matches
    assert propose((1, 256, 0, 5, 1), 2, 1, 1) == (256, 0)
    assert num_accepted((1, 2, 3), (1, 2, 4, 5)) == 2 and num_accepted((1,), (2, 1)) == 0


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        EngineConfig(speculative={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown key"):
        EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative={"method": "ngram"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                                  "prompt_lookup_max": 2})
    c = EngineConfig(speculative={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert c.speculative == SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=3, prompt_lookup_min=3)
    assert EngineConfig(speculative={}).speculative is None


@settings(max_examples=25)
@given(reqs=requests(), config=engine_configs(), spec=spec_configs())
def test_replay_is_exact_with_speculation(reqs, config, spec):
    config = _small_vocab(config, spec)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.jsonl")
        rec = TraceWriter(path)
        engine = LLMEngine(config, FakeExecutor(config.cache.num_blocks, config.cache.block_size, VOCAB, EOS, 0, cycle=2,
                                                 sliding_window=config.cache.sliding_window),
                           recorder=rec, clock=lambda: 0.0)
        for r in reqs:
            try:
                engine.add_request(r.request_id, list(r.prompt_token_ids), r.sampling)
            except ValueError:
                pass
        n = 0
        while engine.has_unfinished_requests():
            engine.step()
            n += 1
            assert n < 5000
        rec.close()
        trace = read_trace(path)
        assert trace.config == config
        assert verify(trace) is None
        ex = FakeExecutor(config.cache.num_blocks, config.cache.block_size, VOCAB, EOS, 0, cycle=2,
                                                 sliding_window=config.cache.sliding_window)
        assert verify_device(trace, ex) is None


def test_rows_with_per_position_state_are_not_speculated():
    from fnllm.spec import can_speculate

    from fnllm.state import GuidedDecodingParams

    Params = SamplingParams
    assert can_speculate(SamplingParams()) and can_speculate(Params(repetition_penalty=1.0, bad_words=[]))
    for kw in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.1},
               {"guided_decoding": GuidedDecodingParams(regex="a")}, {"bad_words": ["a b"]},
               {"bad_words_token_ids": [[3, 4]]}):
        assert not can_speculate(Params(**kw)), kw
