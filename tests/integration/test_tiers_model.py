"""Tiered KV on the real model (SmolLM2): swap preemption on a cramped pool
and host prefix-cache hits give the greedy tokens of a roomy run, with the
moves asserted from the recorded trace."""

from __future__ import annotations

import json

import pytest

from fnllm.cli import build_parser
from fnllm.config import CacheConfig, EngineConfig, SchedulerConfig
from fnllm.device.executor import ModelExecutor
from fnllm.device.kv_tiers import HostKV
from fnllm.engine import LLMEngine
from fnllm.llm import LLM
from fnllm.state import SamplingParams
from fnllm.trace import TraceWriter, read_trace
from fnllm.replay import verify

pytestmark = pytest.mark.slow

NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
RAW = ["The three primary colors are", "def fibonacci(n):\n    ", "北京是中国的", "Once upon a time, a robot 🤖"]
SYSTEM = "You are a concise assistant. Answer in one short sentence and never use lists or markdown. " * 2


HOST_BLOCKS = 64


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    """The shared demo model (block size 16), its executor given a host tier."""
    ex = smollm2_llm.llm_engine.executor
    if ex.host_kv is None:
        ex.host_kv = HostKV(HOST_BLOCKS, ex.kv_caches)
    return smollm2_llm


def engine(llm, *, num_blocks, mode, caching=False, host=True, trace=None) -> LLMEngine:
    """A fresh engine over the loaded model with its own pool, host tier and preemption mode."""
    base = llm.llm_engine.config
    config = EngineConfig(
        model=base.model,
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=caching,
                          num_host_blocks=HOST_BLOCKS if host else 0),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=512, preemption_mode=mode),
    )
    return LLMEngine(config, llm.llm_engine.executor, llm.get_tokenizer(), recorder=trace and TraceWriter(trace))


def run(eng: LLMEngine, prompts, sp=GREEDY) -> dict:
    for k, p in enumerate(prompts):
        eng.add_request(f"q{k}", {"prompt_token_ids": p}, sp)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return {rid: o.outputs[0].token_ids for rid, o in done.items()}


def moves(trace_path) -> tuple[int, int]:
    outs = ins = 0
    with open(trace_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] == "step":
                outs += len(rec["rows"]["swap_out"])
                ins += len(rec["rows"]["swap_in"])
    return outs, ins


def test_executor_sizes_the_host_tier_from_swap_space(tiny_llama):
    path, _ = tiny_llama
    ex = ModelExecutor(path, num_blocks=8, block_size=4, device="cpu", swap_space_bytes=1 << 20)
    per_block = ex.config.kv_block_bytes(4, 4)
    assert ex.num_host_blocks == (1 << 20) // per_block > 0
    assert ex.host_kv.caches[0].shape == (2, ex.num_host_blocks) + tuple(ex.kv_caches[0].shape[2:])
    assert ModelExecutor(path, num_blocks=8, block_size=4, device="cpu").host_kv is None


def test_bad_tier_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="swap_space"):
        LLM(str(tmp_path), swap_space=-1)
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(str(tmp_path), preemption_mode="evict")
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(str(tmp_path), kv_offload_dir=str(tmp_path), enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_offload_bytes"):
        LLM(str(tmp_path), kv_offload_dir=str(tmp_path), kv_offload_bytes=0)
    args = build_parser().parse_args(["generate", "x", "--swap-space", "2", "--preemption-mode", "swap",
                                      "--kv-offload-dir", "d", "--kv-offload-bytes", "1000"])
    assert args.swap_space == 2.0 and args.preemption_mode == "swap"
    assert args.kv_offload_dir == "d" and args.kv_offload_bytes == 1000


def test_swap_preemption_equals_roomy_run(llm, tmp_path):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(r) for r in RAW]
    assert all(len(p) <= 12 for p in prompts)
    roomy = run(engine(llm, num_blocks=256, mode="recompute", host=False), prompts)
    trace = tmp_path / "swap.jsonl"
    eng = engine(llm, num_blocks=4, mode="swap", trace=str(trace))  # 4 x 2 blocks wanted
    got = run(eng, prompts)
    eng.recorder.close()
    assert got == roomy
    outs, ins = moves(trace)
    assert outs > 0 and ins > 0, "the cramped pool was meant to force swaps"
    assert eng.state.num_preemptions > 0
    assert eng.state.pool.num_free == 4 and eng.state.pool.host.num_free == eng.state.pool.host.num_blocks
    assert verify(read_trace(str(trace))) is None, "replay reproduces the swaps"


def test_host_prefix_cache_hit_equals_recompute(llm, tmp_path):
    """A shared system prompt, evicted from a small device pool by other
    requests, comes back from the host tier: same tokens, swap_in in the trace."""
    tok = llm.get_tokenizer()
    sys_ids = tok.encode(SYSTEM)
    prompts = [sys_ids + tok.encode(r) for r in RAW[:2]]
    filler = [tok.encode(RAW[0] * 20)[:80]]  # 5 blocks: more than the pool has free and uncached
    cold = run(engine(llm, num_blocks=256, mode="recompute", host=False), prompts[1:])
    trace = tmp_path / "hostcache.jsonl"
    eng = engine(llm, num_blocks=6, mode="recompute", caching=True, trace=str(trace))
    sp1 = SamplingParams(temperature=0.0, max_tokens=1)
    run(eng, prompts[:1], sp1)  # caches the system prompt's blocks
    run(eng, filler, sp1)  # evicts them to the host tier
    before = moves(trace)
    assert before[0] > 0, "eviction was meant to offload blocks to the host tier"
    eng.add_request("again", {"prompt_token_ids": prompts[1]}, GREEDY)
    done, cached = {}, None
    while eng.has_unfinished_requests():
        for out in eng.step():
            cached = out.num_cached_tokens
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    eng.recorder.close()
    assert done["again"] == cold["q0"]
    assert cached == (len(sys_ids) // 16) * 16, "the system prompt's full blocks came from the cache tiers"
    assert moves(trace)[1] > before[1], "the second request's prefix came back by swap_in"
    assert verify(read_trace(str(trace))) is None
