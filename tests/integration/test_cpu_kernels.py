"""The fused CPU kernels against plain float64 references and the eager
backend: paged decode attention over scattered blocks and uneven lengths,
add + RMSNorm (with the residual update), SiLU-and-mul, and the rotary, in
float32 and bfloat16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.device import cpu_kernels
from fnllm.device.cpu import TorchBackend
from fnllm.device.cpu_fused import FusedCpuBackend
from fnllm.model.model_config import DecoderConfig

K = cpu_kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason="the fused CPU kernels did not build here")
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def reference_decode(q, kv, tables, lens, scale):
    """Gather each row's keys/values through its table; attend in float64."""
    b, h, d = q.shape
    kvh, bs = kv.shape[3], kv.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        blocks = tables[i, : math.ceil(n / bs)].long()
        keys = kv[0, blocks].reshape(-1, kvh, d)[:n].double()
        vals = kv[1, blocks].reshape(-1, kvh, d)[:n].double()
        g = h // kvh
        for head in range(h):
            s = keys[:, head // g] @ q[i, head].double() * scale
            out[i, head] = torch.softmax(s, 0) @ vals[:, head // g]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block", [(9, 3, 64, 16), (4, 4, 32, 4), (8, 2, 128, 128)])
def test_paged_decode_matches_reference(dtype, heads, kv_heads, head_dim, block):
    g = torch.Generator().manual_seed(heads * head_dim)
    lens = torch.tensor([1, block - 1, block, 3 * block + 5, 2], dtype=torch.int32)
    per = math.ceil(int(lens.max()) / block) + 1
    nb = len(lens) * per + 3
    kv = torch.randn(2, nb, block, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: len(lens) * per].view(len(lens), per).int()  # scattered blocks
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    got = K.paged_decode(q, kv, tables, lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), reference_decode(q, kv, tables, lens, scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 8), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_decode_lone_row_split_by_heads(dtype, heads, kv_heads, head_dim):
    """Fewer rows than threads: a row's query heads are split over the
    threads; each head's result is bit-identical to the row's in a batch."""
    g = torch.Generator().manual_seed(heads)
    lens = torch.tensor([37, 5, 64, 20], dtype=torch.int32)
    kv = torch.randn(2, 40, 8, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(40, generator=g)[:32].view(4, 8).int()
    q = torch.randn(4, heads, head_dim, generator=g).to(dtype)
    batch = K.paged_decode(q, kv, tables, lens, 0.125)
    threads = torch.get_num_threads()
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            for i in range(4):
                alone = K.paged_decode(q[i : i + 1].contiguous(), kv, tables[i : i + 1].contiguous(), lens[i : i + 1], 0.125)
                assert torch.equal(alone[0], batch[i])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(batch.double(), reference_decode(q, kv, tables, lens, 0.125), **TOL[dtype])


def test_paged_decode_rejects_bad_input():
    kv = torch.zeros(2, 4, 4, 2, 8)
    with pytest.raises(RuntimeError, match="int32"):
        K.paged_decode(torch.zeros(1, 4, 8), kv, torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="block id 9 outside the cache of 4 blocks"):
        K.paged_decode(torch.zeros(1, 4, 8), kv, torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        K.paged_decode(torch.zeros(1, 4, 8), kv, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([9], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        K.paged_decode(torch.zeros(1, 3, 8), kv, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_index_copy(dtype):
    """Each token's k and v land at its slot, as the eager backend's index_copy_
    puts them (v a strided view of the fused qkv, as the model passes it); no
    other slot changes."""
    g = torch.Generator().manual_seed(3)
    kvh, d, t = 2, 8, 5
    cache = torch.randn(2, 6, 4, kvh, d, generator=g).to(dtype)
    qkv = torch.randn(t, (4 + 2 * kvh) * d, generator=g).to(dtype)
    k, v = qkv[:, 4 * d : (4 + kvh) * d].contiguous().view(t, kvh, d), qkv[:, (4 + kvh) * d :].view(t, kvh, d)
    slots = torch.tensor([0, 23, 7, 8, 12])
    want = cache.clone()
    want[0].view(-1, kvh, d).index_copy_(0, slots, k)
    want[1].view(-1, kvh, d).index_copy_(0, slots, v)
    K.write_kv(k, v, cache, slots)
    assert torch.equal(cache, want)


def test_write_kv_rejects_bad_input():
    cache = torch.zeros(2, 3, 4, 2, 8)
    k = torch.zeros(2, 2, 8)
    before = cache.clone()
    with pytest.raises(RuntimeError, match="slot 12 of token 1 is outside the cache of 12 slots"):
        K.write_kv(k, k, cache, torch.tensor([0, 12]))
    with pytest.raises(RuntimeError, match="slot -1 of token 0"):
        K.write_kv(k, k, cache, torch.tensor([-1, 0]))
    assert torch.equal(cache, before)  # a bad slot anywhere: nothing written
    with pytest.raises(RuntimeError, match="must be \\[2, 2, 8\\]"):
        K.write_kv(torch.zeros(2, 16), k, cache, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="heads must be contiguous"):
        K.write_kv(torch.zeros(2, 8, 2).transpose(1, 2), k, cache, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="int64"):
        K.write_kv(k, k, cache, torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_add_rms_norm_and_silu_mul(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(96, generator=g).to(dtype)
    want_res = (res.double() + x.double()).to(dtype)
    want = F.rms_norm(want_res.double(), (96,), w.double(), 1e-6)
    res_k = res.clone()
    got = K.add_rms_norm(x, res_k, w, 1e-6)
    torch.testing.assert_close(res_k, want_res, atol=0, rtol=0)  # the residual is updated in place, rounded once
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    torch.testing.assert_close(K.add_rms_norm(None, x, w, 1e-6).double(), F.rms_norm(x.double(), (96,), w.double(), 1e-6), **TOL[dtype])
    gu = torch.randn(rows, 2 * 80, generator=g).to(dtype)
    want = F.silu(gu[:, :80].double()) * gu[:, 80:].double()
    torch.testing.assert_close(K.silu_mul(gu).double(), want, **TOL[dtype])


def _backends(dtype):
    cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=96, intermediate_size=128,
                        num_layers=1, num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                        attention_bias=False)
    eager = TorchBackend(cfg, block_size=4, device="cpu", dtype=dtype)
    fused = FusedCpuBackend(cfg, block_size=4, device="cpu", dtype=dtype, kernels=K)
    return cfg, eager, fused


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_eager_backend(dtype):
    from fnllm.model.pangu import rope_cos_sin_cache

    cfg, eager, fused = _backends(dtype)
    cache = rope_cos_sin_cache(cfg, "cpu")
    positions = torch.tensor([0, 1, 5, 200, 31])
    qkv = torch.randn(5, (6 + 2 * 2) * 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    cs = cache.index_select(0, positions)
    cos, sin = cs[:, :8], cs[:, 8:]
    meta_e = type("M", (), {"cos": torch.cat((cos, cos), -1).unsqueeze(1).to(dtype),
                            "sin": torch.cat((-sin, sin), -1).unsqueeze(1).to(dtype)})()
    fused._cos_sin = cache
    meta_f = type("M", (), {"positions": positions})()
    for a, b in zip(eager.rope_qkv(qkv, meta_e), fused.rope_qkv(qkv, meta_f)):
        torch.testing.assert_close(b, a, atol=1e-5 if dtype == torch.float32 else 0, rtol=1e-5 if dtype == torch.float32 else 0)


# -- bounds: random tables and positions, invalid ones included ---------------------------

@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_paged_decode_bounds_property(data):
    """A valid table gives the reference's numbers; any block id outside the
    cache or a length outside the table is a clean error, never a stray read."""
    nb, bs, kvh, g, d = data.draw(st.integers(1, 6)), data.draw(st.sampled_from((2, 4))), 2, 2, 8
    rows, width = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    tables = torch.tensor(data.draw(st.lists(st.lists(st.integers(-2, nb + 2), min_size=width, max_size=width),
                                             min_size=rows, max_size=rows)), dtype=torch.int32)
    lens = torch.tensor(data.draw(st.lists(st.integers(-1, width * bs + 2), min_size=rows, max_size=rows)),
                        dtype=torch.int32)
    kv = torch.randn(2, nb, bs, kvh, d, generator=torch.Generator().manual_seed(nb))
    q = torch.randn(rows, kvh * g, d, generator=torch.Generator().manual_seed(rows))
    valid = all(
        1 <= int(n) <= width * bs and all(0 <= int(b) < nb for b in t[: math.ceil(int(n) / bs)])
        for t, n in zip(tables, lens)
    )
    if not valid:
        with pytest.raises(RuntimeError, match="outside the cache|does not fit its block table"):
            K.paged_decode(q, kv, tables, lens, 0.5)
        return
    torch.testing.assert_close(K.paged_decode(q, kv, tables, lens, 0.5).double(),
                               reference_decode(q, kv, tables, lens, 0.5), **TOL[torch.float32])


@settings(max_examples=60, deadline=None)
@given(positions=st.lists(st.integers(-3, 260), min_size=1, max_size=6))
def test_rope_bounds_property(positions):
    """Positions inside the 256-row table rotate as the eager path does; any
    other position is a clean error naming it."""
    from fnllm.model.pangu import rope_cos_sin_cache

    cfg, eager, fused = _backends(torch.float32)
    cache = rope_cos_sin_cache(cfg, "cpu").float().contiguous()
    pos = torch.tensor(positions)
    qkv = torch.randn(len(positions), (6 + 2 * 2) * 16, generator=torch.Generator().manual_seed(len(positions)))
    if not all(0 <= p < cache.shape[0] for p in positions):
        with pytest.raises(RuntimeError, match="outside the table of 256 positions"):
            K.rope(qkv, pos, cache, 6, 2)
        return
    cs = cache.index_select(0, pos)
    cos, sin = cs[:, :8], cs[:, 8:]
    meta_e = type("M", (), {"cos": torch.cat((cos, cos), -1).unsqueeze(1), "sin": torch.cat((-sin, sin), -1).unsqueeze(1)})()
    for a, b in zip(eager.rope_qkv(qkv, meta_e), K.rope(qkv, pos, cache, 6, 2)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_kernels_reject_mismatched_shapes():
    with pytest.raises(RuntimeError, match="weight must match"):
        K.add_rms_norm(None, torch.zeros(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="x and residual differ"):
        K.add_rms_norm(torch.zeros(3, 8), torch.zeros(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="even"):
        K.silu_mul(torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match="positions for"):
        K.rope(torch.zeros(2, 10 * 16), torch.zeros(3, dtype=torch.int64), torch.zeros(4, 16), 6, 2)
    with pytest.raises(RuntimeError, match="head size"):
        K.paged_decode(torch.zeros(1, 4, 8), torch.zeros(2, 4, 4, 2, 16), torch.zeros(1, 1, dtype=torch.int32),
                       torch.ones(1, dtype=torch.int32), 1.0)
