"""Sliding window (Mistral) on a tiny random checkpoint: greedy tokens equal
transformers' ``MistralForCausalLM`` with prompt + output far longer than
the window, while blocks outside every window are released (holes, seen in
the engine's state); and the device never reads a hole: tables whose
released blocks are holes, and whose released blocks are poisoned with NaN,
give the logits of full tables on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fnllm.blocks import first_window_block
from fnllm.device import cpu_kernels
from fnllm.device.batch import build_host_batch
from fnllm.device.executor import ModelExecutor
from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.engine import LLMEngine
from fnllm.llm import _engine_config
from fnllm.model.model_config import decoder_config_from_dict
from fnllm.state import HOLE, SamplingParams
from integration_support import Driver, Seq, make_plan, mistral_config, reference_logits, reference_model, tokens, write_checkpoint

W, BS = 10, 4
NEW = 20
PROMPTS = [tokens(30, 71), tokens(23, 72), tokens(17, 73)]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    cfg = mistral_config(W)
    model = reference_model(cfg, seed=5)
    return write_checkpoint(tmp_path_factory.mktemp("mistral"), cfg, model), model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (no cache involved)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def use_kernels(monkeypatch, fused: bool) -> None:
    if not fused:
        monkeypatch.setenv("FNLLM_CPU_KERNELS", "0")
    elif cpu_kernels.load() is None:
        pytest.skip("the fused CPU kernels did not build here")


class _NoTokenizer:
    eos_token_ids = ()


def test_mistral_config_carries_the_window(tiny_mistral):
    cfg = decoder_config_from_dict(mistral_config(W), "config.json")
    assert cfg.architecture == "MistralForCausalLM" and cfg.sliding_window == W
    engine_cfg = _engine_config(
        cfg, _NoTokenizer(), path="x", dtype="float32", device="cpu", seed=0, max_model_len=None, max_num_seqs=4,
        max_num_batched_tokens=None, block_size=BS, enable_prefix_caching=True, enable_chunked_prefill=True,
        num_kv_blocks=16, kv_cache_memory=None, policy="fcfs", long_prefill_token_threshold=0, max_logprobs=20)
    assert engine_cfg.cache.sliding_window == W  # what the pure core sees
    assert decoder_config_from_dict(dict(mistral_config(W), sliding_window=None), "c").sliding_window is None
    with pytest.raises(ValueError, match="sliding_window"):
        decoder_config_from_dict(dict(mistral_config(W), sliding_window=0), "config.json")


@pytest.mark.parametrize("fused,cramped", [(False, False), (True, False), (True, True)],
                         ids=["eager", "fused", "fused-cramped-swap"])
def test_greedy_matches_transformers_mistral(tiny_mistral, monkeypatch, fused, cramped):
    path, model = tiny_mistral
    use_kernels(monkeypatch, fused)
    blocks, host = (9, 32) if cramped else (64, 0)
    ex = ModelExecutor(path, device="cpu", num_blocks=blocks, block_size=BS, num_host_blocks=host)
    config = EngineConfig(
        model=ModelConfig(model=str(path), vocab_size=ex.vocab_size),
        cache=CacheConfig(block_size=BS, num_blocks=blocks, num_host_blocks=host, sliding_window=ex.config.sliding_window),
        scheduler=SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=4, max_model_len=64,
                                  preemption_mode="swap" if cramped else "recompute"),
    )
    engine = LLMEngine(config, ex)
    sp = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    for k, p in enumerate(PROMPTS):
        engine.add_request(f"m{k}", {"prompt_token_ids": p}, sp)
    got, holes, most_held = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        for table in engine.state.running.tables:
            holes += table.count(HOLE)
            most_held = max(most_held, len(table) - table.count(HOLE))
    for k, p in enumerate(PROMPTS):
        assert got[f"m{k}"] == hf_greedy(model, p, NEW), f"request m{k}"
    assert holes > 0, "no block was ever released"
    longest = max(len(p) for p in PROMPTS) + NEW - 1
    # a sequence never holds more than its window and one step's chunk (here 7 blocks of the 13 it spans)
    assert most_held <= math.ceil((W + 12 + BS - 2) / BS) < math.ceil(longest / BS)
    if cramped:
        assert engine.state.num_preemptions > 0 and ex.host_kv.swapped_out > 0
    pool = engine.state.pool
    assert pool.num_free == pool.num_blocks and pool.host.num_free == pool.host.num_blocks


def holed_plans(window: int, block_size: int, num_blocks: int):
    """Plans for two sequences (chunked prompts, then decodes, mixed), as
    (plan with full tables, plan with holes before each row's window)."""
    drv = Driver(num_blocks, block_size, seed=3)
    a, b = Seq(tokens(60, 31)), Seq(tokens(60, 32))
    steps = [[drv.row(a, 14, num_samples=0)], [drv.row(a, 14, num_samples=0), drv.row(b, 9, num_samples=0)],
             [drv.row(a, 9), drv.row(b, 14)]]
    steps += [[drv.row(a, 1), drv.row(b, 1 if k % 3 else 5)] for k in range(8)]
    out = []
    for rows in steps:
        holed = [dict(r, block_tables=tuple(HOLE if j < first_window_block(r["positions"], window, block_size) else x
                                            for j, x in enumerate(r["block_tables"]))) for r in rows]
        out.append((make_plan(rows), make_plan(holed)))
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_holes_are_never_read(tiny_mistral, monkeypatch, fused):
    """Holes (and NaN in the released blocks) change no logit: nothing outside the window is read."""
    path, _ = tiny_mistral
    use_kernels(monkeypatch, fused)
    full = ModelExecutor(path, device="cpu", num_blocks=40, block_size=BS)
    holed = ModelExecutor(path, device="cpu", num_blocks=40, block_size=BS)
    assert holed.config.sliding_window == W
    seen = 0
    for plan, plan_h in holed_plans(W, BS, 40):
        released = {x for t, th in zip(plan.block_tables, plan_h.block_tables) for x, y in zip(t, th) if y == HOLE}
        seen += len(released)
        for cache in holed.kv_caches:
            cache[:, sorted(released)] = float("nan")
        want, got = full.compute_logits(plan), holed.compute_logits(plan_h)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen > 0


def test_a_hole_inside_the_window_is_refused():
    (plan, plan_h) = holed_plans(W, BS, 40)[-1]
    table = list(plan_h.block_tables[0])
    j = first_window_block(plan_h.positions[0], W, BS)
    table[j] = HOLE  # the first block the row reads
    bad = make_plan([dict(token_ids=plan_h.token_ids[0], positions=plan_h.positions[0], block_tables=tuple(table),
                          num_samples=1, sample_index=0, output_pos=0, sampling=plan_h.sampling[0])])
    with pytest.raises(ValueError, match="reads a hole"):
        build_host_batch(bad, BS, 256, num_blocks=40, sliding_window=W)
    with pytest.raises(ValueError, match="reads a hole"):  # no window: every hole is read
        build_host_batch(plan_h, BS, 256, num_blocks=40)
    batch = build_host_batch(plan_h, BS, 256, num_blocks=40, sliding_window=W)
    assert (batch.block_tables == HOLE).any()  # handed on, before each row's first_blocks only
    for i, first in enumerate(batch.first_blocks):
        assert not (batch.block_tables[i, first : -(-int(batch.seq_lens[i]) // BS)] == HOLE).any()


def test_fused_kernel_window(monkeypatch):
    k = cpu_kernels.load()
    if k is None:
        pytest.skip("the fused CPU kernels did not build here")
    torch.manual_seed(0)
    B, H, KVH, D, NB, bs, w = 3, 4, 2, 16, 24, 4, 7
    kv = torch.randn(2, NB, bs, KVH, D)
    q = torch.randn(B, H, D)
    lens = torch.tensor([5, 17, 30], dtype=torch.int32)
    tables = torch.randperm(NB)[: B * 8].view(B, 8).to(torch.int32)
    want = k.paged_decode(q, kv, tables, lens, 0.25, w)
    for b, n in enumerate(lens.tolist()):  # reference: softmax over the row's last w keys
        pos = torch.arange(max(0, n - w), n)
        blocks = tables[b, pos // bs].long()
        keys, vals = kv[0, blocks, pos % bs], kv[1, blocks, pos % bs]  # [w, KVH, D]
        rep = H // KVH
        s = torch.einsum("hd,lhd->hl", q[b], keys.repeat_interleave(rep, 1)) * 0.25
        ref = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vals.repeat_interleave(rep, 1))
        torch.testing.assert_close(want[b], ref, atol=1e-5, rtol=1e-5)
    holed = tables.clone()
    for b, n in enumerate(lens.tolist()):
        holed[b, : max(0, n - w) // bs] = HOLE
    torch.testing.assert_close(k.paged_decode(q, kv, holed, lens, 0.25, w), want)
    holed[2, max(0, 30 - w) // bs] = HOLE  # a hole the row reads
    with pytest.raises(RuntimeError, match="outside the cache"):
        k.paged_decode(q, kv, holed, lens, 0.25, w)
    assert np.isfinite(want.numpy()).all()
