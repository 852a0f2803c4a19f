"""Record a run through the engine, replay it through the pure core: every
plan and state digest reproduced; tampering is caught at the right step."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.replay import compare_traces, state_at, verify, verify_device
from fnllm.state import StepOutput
from fnllm.trace import TraceWriter, output_from_json, output_to_json, read_trace, state_digest
from tests.property.invariants import snapshot
from tests.property.strategies import EOS, engine_configs, prompts, sampling_params

events = st.lists(
    st.one_of(
        st.tuples(st.just("add"), prompts(), sampling_params()),
        st.tuples(st.just("abort"), st.integers(0, 20)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=14,
)


def record(config, evs, path):
    """Run ``evs`` through an engine recording to ``path``; live states per step."""
    ex = FakeExecutor(config.cache.num_blocks, config.cache.block_size, config.model.vocab_size, EOS, 9,
                      sliding_window=config.cache.sliding_window)
    rec = TraceWriter(path)
    engine = LLMEngine(config, ex, recorder=rec, clock=lambda: 0.0)
    live, n = {}, 0
    for ev in evs:
        if ev[0] == "add":
            try:
                engine.add_request(f"r{n}", list(ev[1]), ev[2])
            except ValueError:
                pass
            n += 1
        elif ev[0] == "abort":
            engine.abort_request(f"r{ev[1]}")
        else:
            for _ in range(ev[1]):
                _step(engine, live)
    while engine.state.requests:
        _step(engine, live)
    rec.close()
    return live


def _step(engine, live: dict) -> None:
    """One engine step; the state after it, keyed by step number (an idle
    step, with nothing live, does not advance the state and is not recorded)."""
    before = engine.state.step
    engine.step()
    if engine.state.step > before:
        live[engine.state.step - 1] = engine.state


@pytest.fixture
def trace_path():
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    yield path
    os.unlink(path)


@given(config=engine_configs(), evs=events)
def test_replay_reproduces_every_plan_and_state(config, evs):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.jsonl")
        live = record(config, evs, path)
        trace = read_trace(path)
        assert trace.config == config
        assert verify(trace) is None
        for step, state in live.items():
            replayed = state_at(trace, step)
            # the engine may have applied a stop-string finish after commit: compare digests of commits
            assert state_digest(replayed) == state_digest(state) or trace_has_finish(trace, step)
            assert snapshot(replayed) == snapshot(state) or trace_has_finish(trace, step)
        ex = FakeExecutor(config.cache.num_blocks, config.cache.block_size, config.model.vocab_size, EOS, 9,
                      sliding_window=config.cache.sliding_window)
        assert verify_device(trace, ex) is None


def trace_has_finish(trace, step):
    return any(e["type"] == "finish" and e["step"] == step + 1 for e in trace.events)


@given(sampled=st.lists(st.lists(st.integers(0, 96), max_size=3), max_size=5))
def test_step_output_round_trips(sampled):
    out = StepOutput(sampled=tuple(tuple(s) for s in sampled))
    assert output_from_json(json.loads(json.dumps(output_to_json(out)))) == out


def _tamper(path, fn):
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    fn(lines)
    with open(path, "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))


def _config():
    from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineConfig(
        model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
        cache=CacheConfig(block_size=4, num_blocks=12),
        scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=64),
    )


WORK = [("add", (1, 2, 3, 4, 5, 6, 7), None), ("step", 3), ("add", (9, 8, 7), None), ("step", 30)]


def _work():
    from fnllm.state import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    return [(k, v, sp) if k == "add" else (k, v) for k, v, *_ in WORK]


def test_tampered_token_is_caught_at_its_step(trace_path):
    record(_config(), _work(), trace_path)

    def fn(lines):
        st_lines = [x for x in lines if x["type"] == "step" and any(x["sampled"])]
        target = st_lines[2]
        row = next(r for r, s in enumerate(target["sampled"]) if s)
        target["sampled"][row][0] = (target["sampled"][row][0] + 1) % 97
        fn.step = target["step"]

    _tamper(trace_path, fn)
    d = verify(read_trace(trace_path))
    assert d is not None and d.step == fn.step and d.kind == "state"
    ex = FakeExecutor(12, 4, 97, EOS, 9)
    d2 = verify_device(read_trace(trace_path), ex)
    assert d2 is not None and d2.step == fn.step and d2.kind == "token"


def test_tampered_event_step_is_caught_at_the_earlier_step(trace_path):
    record(_config(), _work(), trace_path)

    def fn(lines):
        adds = [x for x in lines if x["type"] == "add"]
        assert adds[1]["step"] == 3
        adds[1]["step"] = 1

    _tamper(trace_path, fn)
    d = verify(read_trace(trace_path))
    assert d is not None and d.step == 1 and d.kind == "plan"


def test_tampered_config_is_caught_at_the_first_step(trace_path):
    record(_config(), _work(), trace_path)

    def fn(lines):
        lines[0]["config"]["cache"]["block_size"] = 8

    _tamper(trace_path, fn)
    d = verify(read_trace(trace_path))
    assert d is not None and d.step == 0


def test_crashed_trace_reads_up_to_its_last_complete_line(trace_path):
    record(_config(), _work(), trace_path)
    with open(trace_path) as f:
        text = f.read()
    with open(trace_path, "w") as f:
        f.write(text[: len(text) - 25])  # cut the last line in the middle
    trace = read_trace(trace_path)
    assert trace.truncated
    assert verify(trace) is None


def test_compare_traces_finds_the_first_difference(trace_path):
    record(_config(), _work(), trace_path)
    other = trace_path + ".b"
    record(_config(), _work(), other)
    try:
        assert compare_traces(read_trace(trace_path), read_trace(other)) is None
        def fn(lines):
            target = [x for x in lines if x["type"] == "step" and any(x["sampled"])][3]
            row = next(r for r, s in enumerate(target["sampled"]) if s)
            target["sampled"][row][0] = (target["sampled"][row][0] + 1) % 97
            fn.step = target["step"]

        _tamper(other, fn)
        d = compare_traces(read_trace(trace_path), read_trace(other))
        assert d is not None and d.step == fn.step and d.kind == "token"
    finally:
        os.unlink(other)
