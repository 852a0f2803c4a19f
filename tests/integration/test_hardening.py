"""Regression tests for the hardening findings (issue 11), on the demo model
where a device is involved: each test names the finding it pins."""

from __future__ import annotations

import numpy as np
import pytest

from fnllm.engine import LLMEngine
from fnllm.errors import EngineDeadError
from fnllm.llm import LLM
from fnllm.state import SamplingParams, StepOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), dtype="float32", device="cpu", num_kv_blocks=256, max_model_len=512, seed=0)


def fresh_engine(llm, executor=None, **kw) -> LLMEngine:
    base = llm.llm_engine
    return LLMEngine(base.config, executor or base.executor, llm.get_tokenizer(), **kw)


def drain(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in done, "a request ended twice"
            if out.finished:
                done[out.request_id] = out
    assert engine.state.pool.num_free == engine.config.cache.num_blocks
    return done


def test_1_double_abort_before_the_next_step(llm):
    engine = fresh_engine(llm)
    engine.add_request("a", "Hello there", GREEDY)
    engine.add_request("b", "The sky is", GREEDY)
    engine.abort_request("a")
    engine.abort_request("a")
    engine.abort_request(["a", "a", "nobody"])
    done = drain(engine)
    assert done["a"].outputs[0].finish_reason == "abort"
    assert done["b"].outputs[0].finish_reason == "length" and len(done["b"].outputs[0].token_ids) == 12


class PoisonOn:
    """The real executor, failing (after it ran) whenever a plan holds ``rid``."""

    def __init__(self, inner, rid: str) -> None:
        self.inner, self.rid = inner, rid

    def execute(self, plan):
        out = self.inner.execute(plan)
        if self.rid in plan.request_ids:
            raise RuntimeError("NPU error 507015: aicore exception")
        return out


def test_2_poison_request_is_isolated_and_others_are_unchanged(llm):
    prompts = {"p0": "The capital of France is", "p1": "def add(a, b):", "p2": "One, two, three,"}
    clean = fresh_engine(llm)
    for rid, p in prompts.items():
        clean.add_request(rid, p, GREEDY)
    want = drain(clean)
    engine = fresh_engine(llm, PoisonOn(llm.llm_engine.executor, "bad"))
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    engine.add_request("bad", "Tell me a story", GREEDY)
    done = drain(engine)
    assert done["bad"].outputs[0].finish_reason == "error" and "aicore exception" in done["bad"].error
    for rid in prompts:
        assert done[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids
    assert engine.consecutive_failures == 0


def test_2_logprobs_beyond_max_logprobs_is_rejected_naming_both(llm):
    engine = fresh_engine(llm)
    with pytest.raises(ValueError, match=r"logprobs=1000000 exceeds max_logprobs=20"):
        engine.add_request("x", "Hi", SamplingParams(logprobs=10**6))
    assert not engine.state.requests


def test_3_max_model_len_beyond_the_rotary_table_is_refused_before_loading(smollm2_path, monkeypatch):
    import fnllm.device.executor as ex

    monkeypatch.setattr(ex, "load_model", lambda *a, **k: pytest.fail("weights loaded before the config was checked"))
    with pytest.raises(ValueError, match=r"max_model_len=10000000 exceeds the model's max_position_embeddings=8192"):
        LLM(str(smollm2_path), device="cpu", max_model_len=10_000_000)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) must be >= max_num_seqs \(64\)"):
        LLM(str(smollm2_path), device="cpu", max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="num_kv_blocks must be an integer >= 1, got 0"):
        LLM(str(smollm2_path), device="cpu", num_kv_blocks=0)


def test_3_a_plan_past_the_rotary_table_is_a_clean_error(llm):
    ex = llm.llm_engine.executor
    from fnllm.state import BatchPlan

    plan = BatchPlan(step=0, seq_ids=(0,), request_ids=("r",), token_ids=((5,),), positions=(9000,),
                     block_tables=(tuple(range(564)),), num_samples=(1,), sample_index=(0,), output_pos=(1,),
                     sampling=(GREEDY,))
    with pytest.raises(ValueError, match="position 9000 is outside the model's 8192 positions"):
        ex.execute(plan)


class Scripted:
    def __init__(self, script):
        self.script = list(script)

    def execute(self, plan):
        return StepOutput(sampled=tuple(
            tuple([self.script[pos % len(self.script)]] * n) if n else () for n, pos in zip(plan.num_samples, plan.output_pos)
        ))


@pytest.mark.parametrize("stop", [["three four"], ["thr", "xyz"], ["four five six seven"]])
def test_4_streamed_text_never_retracts_with_stop_strings(llm, stop):
    tok = llm.get_tokenizer()
    script = tok.encode(" one two three four five six", add_special_tokens=False)
    engine = fresh_engine(llm, Scripted(script))
    engine.add_request("s", [1, 2, 3], SamplingParams(max_tokens=len(script), ignore_eos=True, stop=stop))
    shown, deltas = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = out.outputs[0].text
            assert now.startswith(shown), f"streamed {shown!r}, then {now!r}"
            deltas.append(now[len(shown):])
            shown = now
    full = tok.decode(script)
    hits = [full.index(s) for s in stop if s in full]
    assert "".join(deltas) == shown == (full[: min(hits)] if hits else full)


def test_5_an_interrupted_generate_leaves_nothing_behind(llm, monkeypatch):
    engine = llm.llm_engine
    real_step, calls = engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["Hello", "World"], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not engine.state.requests
    assert engine.state.pool.num_free == engine.config.cache.num_blocks
    out = llm.generate(["The sky is"], GREEDY, use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 12


class InterruptOnce:
    def __init__(self, inner) -> None:
        self.inner, self.fired = inner, False

    def execute(self, plan):
        if not self.fired:
            self.fired = True
            self.inner.execute(plan)  # KV written, then the interrupt
            raise KeyboardInterrupt
        return self.inner.execute(plan)


def test_6_abort_output_survives_a_failed_step(llm):
    engine = fresh_engine(llm, InterruptOnce(llm.llm_engine.executor))
    engine.add_request("a", "Hello", GREEDY)
    engine.add_request("b", "World", GREEDY)
    engine.abort_request("a")
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    done = drain(engine)
    assert done["a"].outputs[0].finish_reason == "abort"
    assert done["b"].outputs[0].finish_reason == "length"


def test_8_validation_gaps(llm):
    engine = fresh_engine(llm)
    ids = llm.get_tokenizer().encode("Count: one two")
    engine.add_request("np", {"prompt_token_ids": np.array(ids, dtype=np.int64)}, GREEDY)
    engine.add_request("np2", [np.int32(t) for t in ids], GREEDY)
    with pytest.raises(ValueError, match="must hold integers"):
        engine.add_request("f", [1.0, 2.0], GREEDY)
    done = drain(engine)
    assert done["np"].outputs[0].token_ids == done["np2"].outputs[0].token_ids
    no_tok = LLMEngine(engine.config, engine.executor, None)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        no_tok.add_request("s", [1, 2], SamplingParams(stop=["x"]))
    for bad in (42, None):
        with pytest.raises(ValueError, match="prompts must be"):
            llm.generate(bad, use_tqdm=False)
    assert llm.generate([], use_tqdm=False) == []


def test_8_idle_steps_do_not_move_the_state_or_the_trace(llm, tmp_path):
    from fnllm.trace import TraceWriter, read_trace

    path = str(tmp_path / "idle.jsonl")
    engine = fresh_engine(llm, recorder=TraceWriter(path))
    before = engine.state
    for _ in range(5):
        assert engine.step() == []
    assert engine.state is before
    engine.recorder.close()
    assert read_trace(path).events == ()


def test_dead_device_ends_in_engine_dead_error(llm):
    class Dead:
        def execute(self, plan):
            raise RuntimeError("device lost")

    engine = fresh_engine(llm, Dead(), max_consecutive_failures=1)
    for k in range(3):
        engine.add_request(f"r{k}", "Hello", GREEDY)
    with pytest.raises(EngineDeadError, match="device lost"):
        engine.step()
    engine.abort_request(["r0", "r1", "r2"])
    assert engine.state.pool.num_free == engine.config.cache.num_blocks
