"""The ``npu`` attention backend: torch_npu's fused operators, called the way
vllm-ascend calls them (checked against its attention_v1 backend).

- ``_npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)``
  writes K/V by slot (int32 slots; caches ``[num_blocks, block_size, kvh, d]``).
- pure-decode steps: ``_npu_paged_attention(query [B, H, d], key_cache,
  value_cache, num_kv_heads, num_heads, scale_value, block_table int32
  [B, max_blocks], context_lens int32 host tensor of sequence lengths, out)``.
- prefill and mixed steps: ``npu_fused_infer_attention_score`` with
  ``input_layout="TND"``, the caches viewed ``[num_blocks, block_size, kvh*d]``,
  ``actual_seq_lengths`` = cumulative query ends, ``actual_seq_lengths_kv`` =
  sequence lengths, ``sparse_mode=3`` (causal aligned to the bottom right:
  new token ``i`` of a row sees keys ``<= context + i``) with the 2048x2048
  upper-triangular mask that mode asks for. Returns ``(out, lse)``.
- ``npu_rms_norm(x, gamma, eps) -> (y, rstd)``,
  ``npu_add_rms_norm(x, residual, gamma, eps) -> (y, rstd, x + residual)``,
  ``npu_swiglu(x) = silu(x[:, :n]) * x[:, n:]``,
  ``_npu_rotary_embedding(positions, query, key, head_size, cos_sin_cache,
  is_neox_style)`` in place on contiguous ``[T, heads*d]`` q and k, the cache
  ``[max_pos, d]`` (cos half, sin half) in the activations' dtype.

Sliding window (``cfg.sliding_window`` = W), as vllm-ascend calls it:
pure-decode steps use ``npu_fused_infer_attention_score`` with
``input_layout="BSH"`` (query ``[B, 1, H*d]``), ``pre_tokens=W`` and
``actual_seq_lengths=[1] * B``; prefill and mixed steps the TND call above
with ``sparse_mode=4`` (band), ``pre_tokens=W``, ``next_tokens=0``. The
band is taken to keep keys ``k > q - W`` (Mistral's rule, the meaning
vllm-ascend gives ``pre_tokens``); not yet checked on hardware. Holes in a
block table (released blocks, before a row's window) are handed to the
kernels as block 0, a real block whose keys the band masks, so no kernel
indexes a missing block.

torch_npu is imported here only, when the backend is built, so the rest of
fnllm (and a CPU-only install) never needs it. The kernels want block size 128.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fnllm.device.batch import HostBatch
from fnllm.model.model_config import DecoderConfig
from fnllm.state import HOLE

NPU_BLOCK_SIZE = 128
MASK_SIZE = 2048  # sparse_mode=3 takes a fixed 2048x2048 causal mask


def npu_device_available() -> bool:
    """Whether an NPU can be used (imports torch_npu, which registers torch.npu)."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


@dataclass
class NpuMeta:
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int32 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B], on the host (as vllm-ascend passes it)
    seq_lens_list: list[int]
    query_ends: list[int]  # cumulative query lengths, TND's actual_seq_lengths
    pure_decode: bool


class NpuBackend:
    name = "npu"

    def __init__(self, cfg: DecoderConfig, *, block_size: int, device: torch.device, dtype: torch.dtype):
        if block_size != NPU_BLOCK_SIZE:
            raise ValueError(f"the npu attention backend needs block_size {NPU_BLOCK_SIZE}, got {block_size}")
        self.npu = importlib.import_module("torch_npu")
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.block_size, self.device, self.dtype = block_size, torch.device(device), dtype
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.window = cfg.sliding_window
        self.mask = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), diagonal=1).to(self.device)
        self._cos_sin: torch.Tensor | None = None

    def prepare(self, batch: HostBatch, cos_sin_cache: torch.Tensor) -> NpuMeta:
        if self._cos_sin is None:
            self._cos_sin = cos_sin_cache.to(self.dtype)
        dev = self.device
        return NpuMeta(
            positions=torch.from_numpy(batch.positions).to(dev),
            slot_mapping=torch.from_numpy(batch.slot_mapping.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(np.where(batch.block_tables == HOLE, 0, batch.block_tables)).to(dev),
            seq_lens=torch.from_numpy(batch.seq_lens.astype(np.int32)),
            seq_lens_list=batch.seq_lens.tolist(),
            query_ends=batch.query_start_loc[1:].tolist(),
            pure_decode=batch.is_pure_decode,
        )

    packs_linears = False

    def decode_layers(self, layers, x, residual, kv_caches, meta):
        """None: the model runs its layers one by one through these ops."""
        return None

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def rms_norm(self, x, weight, eps):
        return self.npu.npu_rms_norm(x, weight, eps)[0]

    def add_rms_norm(self, x, residual, weight, eps):
        y, _, residual = self.npu.npu_add_rms_norm(x, residual, weight, eps)
        return y, residual

    def silu_mul(self, gate_up):
        return self.npu.npu_swiglu(gate_up)

    def rope_qkv(self, qkv, meta: NpuMeta):
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k = q.contiguous(), k.contiguous()
        self.npu._npu_rotary_embedding(meta.positions, q, k, d, self._cos_sin, True)
        t = qkv.shape[0]
        return q.view(t, h, d), k.view(t, kvh, d), v.contiguous().view(t, kvh, d)

    def attention(self, q, k, v, kv_cache, meta: NpuMeta):
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        self.npu._npu_reshape_and_cache(
            key=k, value=v, key_cache=key_cache, value_cache=value_cache, slot_indices=meta.slot_mapping
        )
        t = q.shape[0]
        if self.window and meta.pure_decode:
            return self._window_decode(q, key_cache, value_cache, meta).view(t, -1)
        if meta.pure_decode:
            out = torch.empty_like(q)
            self.npu._npu_paged_attention(
                query=q, key_cache=key_cache, value_cache=value_cache, num_kv_heads=self.num_kv_heads,
                num_heads=self.num_heads, scale_value=self.scale, block_table=meta.block_tables,
                context_lens=meta.seq_lens, out=out,
            )
            return out.view(t, -1)
        nb = key_cache.shape[0]
        out, _ = self.npu.npu_fused_infer_attention_score(
            query=q,
            key=key_cache.view(nb, self.block_size, -1),
            value=value_cache.view(nb, self.block_size, -1),
            atten_mask=self.mask,
            block_table=meta.block_tables,
            input_layout="TND",
            block_size=self.block_size,
            actual_seq_lengths=meta.query_ends,
            actual_seq_lengths_kv=meta.seq_lens_list,
            num_key_value_heads=self.num_kv_heads,
            num_heads=self.num_heads,
            scale=self.scale,
            **(dict(sparse_mode=4, pre_tokens=self.window, next_tokens=0) if self.window else dict(sparse_mode=3)),
        )
        return out.reshape(t, -1)

    def _window_decode(self, q, key_cache, value_cache, meta: NpuMeta):
        """One new token per row, attending to its last ``window`` keys (BSH layout)."""
        b, nb = q.shape[0], key_cache.shape[0]
        out, _ = self.npu.npu_fused_infer_attention_score(
            q.reshape(b, 1, -1),
            key_cache.view(nb, self.block_size, -1),
            value_cache.view(nb, self.block_size, -1),
            num_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            input_layout="BSH",
            block_size=self.block_size,
            pre_tokens=self.window,
            scale=self.scale,
            block_table=meta.block_tables,
            actual_seq_lengths=[1] * b,
            actual_seq_lengths_kv=meta.seq_lens_list,
        )
        return out.reshape(b, self.num_heads, self.head_dim)
