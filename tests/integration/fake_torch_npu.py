"""A stand-in for ``torch_npu``: the fused operators fnllm's npu backend calls,
implemented from their documented semantics in plain (slow, obvious) torch.

It checks the call conventions the real kernels insist on (int32 slots and
block tables, host ``context_lens``, TND layout with cumulative query ends,
sparse_mode 3 with a 2048x2048 upper-triangular mask, contiguous rotary
inputs), so a backend that passes here calls the real operators correctly.
Sliding window: ``sparse_mode=4`` (band) with ``pre_tokens`` and
``next_tokens=0`` in TND, or the BSH decode call with ``pre_tokens``; a
query at position q keeps keys k with ``q - pre_tokens < k <= q`` (the
meaning vllm-ascend gives it for Mistral's window; unverified on hardware).
Tests install it as ``sys.modules["torch_npu"]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

calls: dict[str, int] = {}


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def npu_rms_norm(x, gamma, epsilon=1e-6):
    _count("npu_rms_norm")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd).to(x.dtype) * gamma, rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    _count("npu_add_rms_norm")
    s = x1 + x2
    y, rstd = npu_rms_norm(s, gamma, epsilon)
    return y, rstd, s


def npu_swiglu(x, dim=-1):
    _count("npu_swiglu")
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def _npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox_style):
    """In place on ``query`` [T, H*d] and ``key`` [T, KVH*d] (contiguous)."""
    _count("_npu_rotary_embedding")
    assert query.is_contiguous() and key.is_contiguous(), "rotary inputs must be contiguous"
    assert is_neox_style, "fnllm models use the neox rotary layout"
    assert cos_sin_cache.dtype == query.dtype, "cos_sin_cache must match the activations' dtype"
    cs = cos_sin_cache.index_select(0, positions.long())
    half = head_size // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (query, key):
        v = x.view(x.shape[0], -1, head_size)
        x1, x2 = v[..., :half].clone(), v[..., half:].clone()
        v[..., :half] = x1 * cos - x2 * sin
        v[..., half:] = x2 * cos + x1 * sin


def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    _count("_npu_reshape_and_cache")
    assert slot_indices.dtype == torch.int32, "slot_indices must be int32"
    assert key_cache.dim() == 4, "key_cache is [num_blocks, block_size, num_kv_heads, head_size]"
    kvh, d = key_cache.shape[2:]
    slots = slot_indices.long()
    key_cache.view(-1, kvh, d)[slots] = key.reshape(-1, kvh, d)
    value_cache.view(-1, kvh, d)[slots] = value.reshape(-1, kvh, d)


def _attend(q, keys, values, scale, num_heads, num_kv_heads, context, pre_tokens=None):
    """q [n, H, d] over keys/values [L, KVH, d]; query i sees keys <= context + i
    (and, with ``pre_tokens``, > context + i - pre_tokens)."""
    n, length = q.shape[0], keys.shape[0]
    rep = num_heads // num_kv_heads
    k = keys.float().repeat_interleave(rep, dim=1)
    v = values.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    q_pos = (context + torch.arange(n))[:, None]
    allowed = torch.arange(length)[None, :] <= q_pos
    if pre_tokens is not None:
        allowed &= torch.arange(length)[None, :] > q_pos - pre_tokens
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), v).to(q.dtype)


def _gather(cache, table, length, block_size, num_kv_heads):
    """The first ``length`` tokens of a sequence, ``[length, kvh, d]``; the
    cache is ``[nb, bs, kvh, d]`` or ``[nb, bs, kvh*d]``."""
    head_size = cache[0].numel() // (block_size * num_kv_heads)
    blocks = [cache[int(b)].reshape(block_size, num_kv_heads, head_size) for b in table[: -(-length // block_size)]]
    return torch.cat(blocks, 0)[:length]


def _npu_paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens, out):
    _count("_npu_paged_attention")
    assert block_table.dtype == torch.int32, "block_table must be int32"
    assert context_lens.dtype == torch.int32 and context_lens.device.type == "cpu", "context_lens: int32 host tensor"
    assert query.dim() == 3 and query.shape[1] == num_heads, "query is [num_tokens, num_heads, head_size]"
    assert query.shape[0] == block_table.shape[0] == context_lens.shape[0], "one query token per sequence"
    bs = key_cache.shape[1]
    for i, length in enumerate(context_lens.tolist()):
        k = _gather(key_cache, block_table[i], length, bs, num_kv_heads)
        v = _gather(value_cache, block_table[i], length, bs, num_kv_heads)
        out[i] = _attend(query[i : i + 1], k, v, scale_value, num_heads, num_kv_heads, length - 1)[0]


def _check_fia(query, key, atten_mask, input_layout, actual_seq_lengths, actual_seq_lengths_kv, sparse_mode, block_size,
               pre_tokens, next_tokens):
    assert key.dim() == 3 and key.shape[1] == block_size, "paged key is [num_blocks, block_size, kvh*d]"
    assert isinstance(actual_seq_lengths, list) and isinstance(actual_seq_lengths_kv, list)
    if input_layout == "BSH":  # the sliding-window decode call: one query token per row
        assert query.dim() == 3 and query.shape[1] == 1, "BSH decode query is [B, 1, H*d]"
        assert actual_seq_lengths == [1] * query.shape[0] and pre_tokens is not None
        return
    assert input_layout == "TND", "fnllm uses the TND layout"
    assert sparse_mode in (3, 4), "chunked prefill needs sparse_mode=3 (bottom-right causal) or 4 (band)"
    if sparse_mode == 4:
        assert pre_tokens is not None and pre_tokens >= 1 and next_tokens == 0, "band: pre_tokens=window, next_tokens=0"
    assert atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048), "sparse_mode 3/4 take a 2048x2048 mask"
    assert bool(atten_mask[0, 1]) and not bool(atten_mask[1, 0]) and not bool(atten_mask[0, 0]), "mask: upper triangle"
    assert all(b >= a for a, b in zip([0] + actual_seq_lengths, actual_seq_lengths)), "query ends are cumulative"
    assert actual_seq_lengths[-1] == query.shape[0], "last query end is the token count"


def npu_fused_infer_attention_score(
    query, key, value, *, num_heads, num_key_value_heads, input_layout, scale, block_table=None,
    block_size=0, actual_seq_lengths=None, actual_seq_lengths_kv=None, sparse_mode=0, atten_mask=None,
    pre_tokens=None, next_tokens=None, **_,
):
    _count("npu_fused_infer_attention_score")
    _check_fia(query, key, atten_mask, input_layout, actual_seq_lengths, actual_seq_lengths_kv, sparse_mode, block_size,
               pre_tokens, next_tokens)
    assert block_table is not None and block_table.dtype == torch.int32, "block_table must be int32"
    assert int(block_table.min()) >= 0, "block_table holds an id that is not a block"
    bsh = input_layout == "BSH"
    q_all = query.reshape(query.shape[0], num_heads, -1) if bsh else query
    out = torch.empty_like(q_all)
    ends = list(range(1, query.shape[0] + 1)) if bsh else actual_seq_lengths
    start = 0
    for i, (end, length) in enumerate(zip(ends, actual_seq_lengths_kv)):
        n = end - start
        k = _gather(key, block_table[i], length, block_size, num_key_value_heads)
        v = _gather(value, block_table[i], length, block_size, num_key_value_heads)
        out[start:end] = _attend(q_all[start:end], k, v, scale, num_heads, num_key_value_heads, length - n, pre_tokens)
        start = end
    out = out.reshape(query.shape) if bsh else out
    lse = torch.zeros(query.shape[0], num_heads, 1)
    return out, lse

