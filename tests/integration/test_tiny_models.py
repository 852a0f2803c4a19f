"""fnllm's forward against transformers' Llama on tiny random checkpoints:
PanguEmbedded (q/k/v/o bias, RoPE 1.6e7, GQA, untied, two shards) and Llama
(no bias, tied embeddings). Logits within fp32 tolerance for full prefill,
chunked prefill, decode from paged KV, mixed batches and copy-on-write, on
both CPU paths of the torch backend: the fused kernels and eager ATen."""

from __future__ import annotations

import pytest
import torch

from fnllm.device import cpu_kernels
from fnllm.device.executor import ModelExecutor
from integration_support import Driver, Seq, make_plan, reference_logits, tokens

ATOL = 1e-4
BLOCK = 4
NUM_BLOCKS = 96


@pytest.fixture(params=["pangu", "llama"], scope="module")
def ckpt(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(params=["fused", "eager"])
def setup(ckpt, request, monkeypatch):
    if request.param == "eager":
        monkeypatch.setenv("FNLLM_CPU_KERNELS", "0")
    elif cpu_kernels.load() is None:
        pytest.skip("the fused CPU kernels did not build here")
    path, hf = ckpt
    ex = ModelExecutor(path, dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
    assert (type(ex.backend).__name__ == "FusedCpuBackend") == (request.param == "fused")
    return ex, hf, Driver(NUM_BLOCKS, BLOCK, seed=3)


def check(logits: torch.Tensor, hf, seqs_and_positions) -> None:
    """Row ``r`` of ``logits`` must equal the reference at (seq, position)."""
    assert logits.shape[0] == len(seqs_and_positions)
    for row, (seq, pos) in zip(logits, seqs_and_positions):
        want = reference_logits(hf, seq.tokens[: pos + 1])[pos]
        torch.testing.assert_close(row, want, atol=ATOL, rtol=1e-4)


def test_config_read(ckpt):
    path, hf = ckpt
    ex = ModelExecutor(path, device="cpu", num_blocks=4, block_size=BLOCK)
    assert ex.vocab_size == 256 and ex.eos_token_ids == (2,) and ex.max_position_embeddings == 512
    assert ex.config.attention_bias == hf.config.attention_bias
    assert ex.kv_caches[0].shape == (2, 4, BLOCK, 2, 16) and len(ex.kv_caches) == 2


def test_full_prefill(setup):
    ex, hf, drv = setup
    seq = Seq(tokens(37, 1))
    logits = ex.compute_logits(make_plan([drv.row(seq, 37)]))
    check(logits, hf, [(seq, 36)])


def test_chunked_prefill(setup):
    ex, hf, drv = setup
    seq = Seq(tokens(41, 2))
    for n in (13, 18, 10):  # chunk ends fall inside blocks
        logits = ex.compute_logits(make_plan([drv.row(seq, n)]))
        check(logits, hf, [(seq, seq.computed - 1)])


def test_decode_steps(setup):
    ex, hf, drv = setup
    seq = Seq(tokens(30, 3))
    ex.compute_logits(make_plan([drv.row(seq, 22, num_samples=0)]))
    assert ex.compute_logits(make_plan([])).shape[0] == 0
    for _ in range(8):
        logits = ex.compute_logits(make_plan([drv.row(seq, 1)]))
        check(logits, hf, [(seq, seq.computed - 1)])


def test_mixed_batch(setup):
    ex, hf, drv = setup
    a, b, c = Seq(tokens(40, 4)), Seq(tokens(40, 5)), Seq(tokens(25, 6))
    ex.compute_logits(make_plan([drv.row(a, 17, num_samples=0), drv.row(b, 9, num_samples=0)]))
    for step in range(3):  # a and b decode while c's prompt goes in as chunks
        rows = [drv.row(a, 1), drv.row(c, 8, num_samples=int(step == 2)), drv.row(b, 1)]
        logits = ex.compute_logits(make_plan(rows))
        want = [(a, a.computed - 1)] + ([(c, c.computed - 1)] if step == 2 else []) + [(b, b.computed - 1)]
        check(logits, hf, want)
    rows = [drv.row(b, 3), drv.row(a, 1), drv.row(c, 1)]  # a short chunk and decodes
    check(ex.compute_logits(make_plan(rows)), hf, [(b, b.computed - 1), (a, a.computed - 1), (c, c.computed - 1)])


def test_many_decode_rows_grouped_by_length(ckpt):
    """40 decode rows of lengths 3..80: the torch backend splits them into
    length groups; every row must still match the reference."""
    path, hf = ckpt
    ex = ModelExecutor(path, device="cpu", num_blocks=900, block_size=BLOCK)
    drv = Driver(900, BLOCK, seed=4)
    seqs = [Seq(tokens(3 + (i * 37) % 78, 100 + i)) for i in range(40)]
    ex.compute_logits(make_plan([drv.row(s, len(s.tokens) - 1, num_samples=0) for s in seqs]))
    logits = ex.compute_logits(make_plan([drv.row(s, 1) for s in seqs]))
    assert logits.shape == (40, 256)
    check(logits, hf, [(s, len(s.tokens) - 1) for s in seqs])


def test_copy_on_write(setup):
    ex, hf, drv = setup
    parent = Seq(tokens(30, 7))
    ex.compute_logits(make_plan([drv.row(parent, 10, num_samples=0)]))  # 2 full blocks + 2 tokens
    child = Seq(parent.tokens[:10] + tokens(6, 8), table=parent.table[:2], computed=10)
    child.table.append(drv.free.pop())
    copies = [(parent.table[2], child.table[2])]
    rows = [drv.row(parent, 1), drv.row(child, 1)]
    check(ex.compute_logits(make_plan(rows, copies=copies)), hf, [(parent, 10), (child, 10)])
    for _ in range(4):
        rows = [drv.row(child, 1), drv.row(parent, 1)]
        check(ex.compute_logits(make_plan(rows)), hf, [(child, child.computed - 1), (parent, parent.computed - 1)])


def test_greedy_generation_matches(setup):
    ex, hf, drv = setup
    prompts = [tokens(11, 9), tokens(5, 10), tokens(19, 11)]
    seqs = [Seq(list(p)) for p in prompts]
    out = [[] for _ in seqs]
    plan = make_plan([drv.row(s, len(s.tokens)) for s in seqs])
    for step in range(10):
        got = ex.execute(plan).sampled
        for s, o, g in zip(seqs, out, got):
            o.append(g[0])
            s.tokens.append(g[0])
        plan = make_plan([drv.row(s, 1, output_pos=step + 1) for s in seqs])
    for p, o in zip(prompts, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ref[0, len(p):].tolist() == o
