"""Real text through ``LLM`` / ``LLMEngine`` with the demo SmolLM2 model:
greedy tokens equal transformers' under batching, chunking, preemption and
prefix caching; seeded sampling; streaming; bad input; aborts."""

from __future__ import annotations

import json

import pytest
import torch

from fnllm.config import CacheConfig, EngineConfig, SchedulerConfig
from fnllm.engine import LLMEngine
from fnllm.llm import LLM
from fnllm.state import SamplingParams, StepOutput

NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
SYSTEM = "You are a concise assistant. Answer in one short sentence and never use lists or markdown."
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "用一句话介绍一下长城。"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "Describe a sunny beach with emoji 🌞🏖️"}],
]
RAW = ["The three primary colors are", "def fibonacci(n):\n    ", "北京是中国的", "Once upon a time, a robot 🤖"]


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.get_tokenizer()
    chats = [tok.apply_chat_template_ids(c) for c in CHATS]
    raws = [tok.encode(r) for r in RAW]
    return [list(p) for p in chats + raws]


@pytest.fixture(scope="module")
def reference(smollm2_path, prompts):
    """transformers' greedy continuation (32 tokens, no EOS stop) with the same dequantized weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    out = []
    with torch.no_grad():
        for p in prompts:  # plain greedy with the KV cache: no EOS masking, no stopping
            res = model(torch.tensor([p]), use_cache=True)
            toks = [int(res.logits[0, -1].argmax())]
            for _ in range(NEW - 1):
                res = model(torch.tensor([[toks[-1]]]), past_key_values=res.past_key_values, use_cache=True)
                toks.append(int(res.logits[0, -1].argmax()))
            out.append(toks)
    return out


def engine_with(llm, *, num_blocks, budget, caching=True, block_size=16, trace=None) -> LLMEngine:
    """A fresh engine sharing the loaded model, with its own (smaller) pool and budget."""
    base = llm.llm_engine.config
    config = EngineConfig(
        model=base.model,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=1024),
    )
    recorder = None
    if trace is not None:
        from fnllm.trace import TraceWriter

        recorder = TraceWriter(trace)
    return LLMEngine(config, llm.llm_engine.executor, llm.get_tokenizer(), recorder=recorder)


def run_engine(engine: LLMEngine, prompts, sp=GREEDY) -> dict:
    for k, p in enumerate(prompts):
        engine.add_request(f"q{k}", {"prompt_token_ids": p}, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_capital_of_france(llm):
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_one_at_a_time_equals_transformers(llm, prompts, reference):
    for p, ref in zip(prompts, reference):
        out = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref


def test_one_batch_equals_transformers(llm, prompts, reference):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def _preempted(trace_path) -> int:
    """Sequences whose computed position fell back (a preemption) in a trace."""
    last, falls = {}, 0
    with open(trace_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] != "step":
                continue
            rows = rec["rows"]
            for sid, pos in zip(rows["seq_ids"], rows["positions"]):
                if pos < last.get(sid, 0):
                    falls += 1
                last[sid] = pos
    return falls


def test_tiny_pool_chunking_and_preemption_equal_transformers(llm, prompts, reference, tmp_path):
    trace = tmp_path / "tiny.jsonl"
    engine = engine_with(llm, num_blocks=14, budget=24, caching=False, trace=str(trace))
    done = run_engine(engine, prompts)
    assert [done[f"q{k}"].outputs[0].token_ids for k in range(len(prompts))] == reference
    assert _preempted(trace) > 0, "the tiny pool was meant to force a preemption"
    assert engine.state.pool.num_free == 14


def test_prefix_caching_with_shared_system_prompt(llm, reference):
    tok = llm.get_tokenizer()
    convs = [[{"role": "system", "content": SYSTEM}] + c for c in CHATS]
    prompts = [tok.apply_chat_template_ids(c) for c in convs]
    cold = run_engine(engine_with(llm, num_blocks=256, budget=512, caching=False), prompts)
    engine = engine_with(llm, num_blocks=256, budget=512, caching=True)
    first = run_engine(engine, prompts[:1])
    engine.add_request("again", {"prompt_token_ids": prompts[1]}, GREEDY)
    engine.step()
    assert engine.last_plan.positions[0] >= 16, "the shared system prompt was not served from the cache"
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                first[out.request_id] = out
    assert first["q0"].outputs[0].token_ids == cold["q0"].outputs[0].token_ids
    assert first["again"].outputs[0].token_ids == cold["q1"].outputs[0].token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm, prompts):
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate({"prompt_token_ids": prompts[0]}, sp, use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=1.0, seed=k, max_tokens=12) for k in range(4)]
    batch = llm.generate(
        [{"prompt_token_ids": p} for p in prompts[1:5]] + [{"prompt_token_ids": prompts[0]}],
        others + [sp], use_tqdm=False,
    )
    assert batch[-1].outputs[0].token_ids == alone.token_ids
    assert batch[-1].outputs[0].text == alone.text


class Scripted:
    """An executor that emits a fixed token script (to test streaming text)."""

    def __init__(self, script):
        self.script = list(script)

    def execute(self, plan):
        sampled = []
        for n, pos in zip(plan.num_samples, plan.output_pos):
            sampled.append(tuple([self.script[pos % len(self.script)]] * n) if n else ())
        return StepOutput(sampled=tuple(sampled))


def test_streamed_deltas_concatenate_to_the_final_text(llm):
    tok = llm.get_tokenizer()
    text = "Hi 👋🏽 你好世界 🚀 café — ok"
    script = tok.encode(text, add_special_tokens=False)
    engine = LLMEngine(llm.llm_engine.config, Scripted(script), tok)
    engine.add_request("s", {"prompt_token_ids": tok.encode("Say:")}, SamplingParams(max_tokens=len(script), ignore_eos=True))
    shown, deltas = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = out.outputs[0].text
            assert now.startswith(shown) and "\ufffd" not in now
            deltas.append(now[len(shown):])
            shown = now
    assert "".join(deltas) == tok.decode(script) == shown


def test_stop_string_split_across_tokens_is_found(llm):
    tok = llm.get_tokenizer()
    script = tok.encode("one two three four five", add_special_tokens=False)
    engine = LLMEngine(llm.llm_engine.config, Scripted(script), tok)
    engine.add_request("s", [1, 2, 3], SamplingParams(max_tokens=len(script), ignore_eos=True, stop=["ree fo"]))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
    c = out[0].outputs[0]
    full = tok.decode(script)
    assert c.finish_reason == "stop" and c.stop_reason == "ree fo"
    assert c.text == full[: full.index("ree fo")]
    assert engine.state.pool.num_free == engine.config.cache.num_blocks


def test_bad_input_is_refused_and_the_engine_keeps_serving(llm, prompts):
    engine = engine_with(llm, num_blocks=32, budget=256)
    engine.add_request("good", {"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0.0, max_tokens=8))
    engine.step()
    vocab = engine.config.model.vocab_size
    bad = [
        ("empty", "", None, "empty"),
        ("empty-ids", {"prompt_token_ids": []}, None, "empty"),
        ("long", {"prompt_token_ids": [5] * 1100}, None, "max_model_len"),
        ("oov", {"prompt_token_ids": [5, vocab + 3]}, None, "vocabulary"),
        ("neg", {"prompt_token_ids": [5, -1]}, None, "vocabulary"),
        ("good", {"prompt_token_ids": [5, 6]}, None, "already in use"),
        ("huge", {"prompt_token_ids": [5] * 900}, SamplingParams(max_tokens=100), "could never be scheduled"),
        ("type", 3.5, None, "prompt must be"),
    ]
    for rid, prompt, sp, words in bad:
        with pytest.raises(ValueError, match=words):
            engine.add_request(rid, prompt, sp)
    for kwargs, words in [
        ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"), ({"top_k": -5}, "top_k"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=words):
            SamplingParams(**kwargs)
    engine.abort_request("never-existed")  # harmless
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert set(done) == {"good"} and len(done["good"].outputs[0].token_ids) == 8
    engine.abort_request("good")  # finished: harmless
    assert engine.state.pool.num_free == 32 and not engine.has_unfinished_requests()


def test_config_that_cannot_work_is_refused(smollm2_path):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(str(smollm2_path), kv_cache_memory=0)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(cache=CacheConfig(block_size=128), scheduler=SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64, max_num_seqs=8))


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_abort_during_prefill_and_decode(llm, prompts, when):
    engine = engine_with(llm, num_blocks=64, budget=8)  # budget 8: prompts take several steps
    engine.add_request("a", {"prompt_token_ids": prompts[2]}, GREEDY)
    engine.add_request("b", {"prompt_token_ids": prompts[5]}, SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    if when == "decode":
        while engine.state.running.num_output[0] == 0:
            engine.step()
    engine.abort_request("a")
    outs = engine.step()
    last = [o for o in outs if o.request_id == "a"]
    assert last and last[0].finished and last[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        assert all(o.request_id != "a" for o in engine.step())
    assert engine.state.pool.num_free == 64


def test_record_and_replay_with_the_device(llm, prompts, tmp_path):
    """A recorded batch with chunked prefill and preemption replays bit for bit,
    through the pure core and re-executed on the model."""
    from fnllm.replay import state_at, verify, verify_device
    from fnllm.trace import read_trace, state_digest

    path = tmp_path / "run.jsonl"
    engine = engine_with(llm, num_blocks=8, budget=24, caching=True, trace=str(path))
    sp = [GREEDY, SamplingParams(temperature=0.8, seed=7, max_tokens=16), GREEDY]
    for k, (p, s) in enumerate(zip(prompts[:3], sp)):
        engine.add_request(f"q{k}", {"prompt_token_ids": p}, s)
    live = {}
    while engine.has_unfinished_requests():
        engine.step()
        live[engine.state.step - 1] = state_digest(engine.state)
    engine.recorder.close()
    trace = read_trace(str(path))
    assert _preempted(path) > 0
    assert verify(trace) is None
    assert verify_device(trace, llm.llm_engine.executor) is None
    mid = len(live) // 2
    assert state_digest(state_at(trace, mid)) == live[mid]
