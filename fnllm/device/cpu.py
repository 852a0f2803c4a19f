"""The ``torch`` attention backend: paged attention in plain torch (CPU, CUDA).

Per step, ``prepare`` builds everything the layers share: slot mapping, the
rotary cos/sin rows of each token, and for the decode rows (one new token)
one flat block index over their block tables plus a length mask.
Per layer, ``attention`` writes K/V by slot (``index_copy_``), gathers the
decode rows' blocks with a single ``index_select`` into a reused buffer and
attends: a single decode row (or a model with many KV heads) through SDPA,
the query heads of each KV head taking the place of its query length (no
repeated heads, no mask when nothing is padded); several rows with few KV
heads through two batched matmuls with block-diagonal queries (every head's
keys are read in one contiguous matmul), softmax in float32. Rows with
several new tokens (prompt chunks) use SDPA, causal within the chunk and over
the whole cached context before it. With a sliding window (``batch.sliding_window``)
a row gathers only its blocks from ``batch.first_blocks`` on (holes before
them are never indexed) and masks keys outside each query's window. On CPU the projection weights are
repacked once into oneDNN's blocked layout (``linear`` then calls
``mkldnn._linear_pointwise``), which halves the time of a decode step's
matmuls on this class of machine."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fnllm.device.batch import HostBatch
from fnllm.model.model_config import DecoderConfig


PACK_BATCH_HINT = 64  # oneDNN picks the packed layout for this many rows; any count works


def _mkldnn_packing_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Pack linear weights for oneDNN on CPU (2x faster bf16/fp32 decode here);
    ``FNLLM_PACK_LINEAR=0`` turns it off."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and os.environ.get("FNLLM_PACK_LINEAR", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


RMS_NORM_SPLIT_ROWS = 256  # rows from which rms_norm uses the composite form
BMM_DECODE_MIN_ROWS = 2  # decode groups this big (and few KV heads) use the block-diagonal matmuls
DECODE_GROUP_ROWS = 16  # decode rows are split by length only in groups at least this big
MAX_DECODE_GROUPS = 4


def decode_groups(seq_lens: np.ndarray, rows: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Decode rows in groups of similar length (shortest first), so padding to
    each group's longest row wastes little gather and matmul work; one group
    (rows in plan order) unless splitting saves at least a sixth of the area."""
    k = min(MAX_DECODE_GROUPS, len(rows) // DECODE_GROUP_ROWS)
    if k < 2:
        return [rows] if len(rows) else []
    order = rows[np.argsort(seq_lens[rows], kind="stable")]
    groups = np.array_split(order, k)
    padded = lambda g: len(g) * -(-int(seq_lens[g].max()) // block_size)  # noqa: E731
    if sum(padded(g) for g in groups) * 6 > padded(rows) * 5:
        return [rows]
    return groups


@dataclass
class DecodeMeta:
    token_idx: torch.Tensor | None  # flat token index of each decode row; None: all tokens
    block_idx: torch.Tensor  # [B * max_blocks] flattened block tables
    mask: torch.Tensor | None  # sdpa: [B, 1, 1, seq_len] bool (True: attend) or None (no padding);
    # bmm: [B, 1, max_blocks * block_size] float32, 0 or -inf
    num_rows: int
    seq_len: int  # the longest row's length (keys beyond it are never read)
    sdpa: bool  # which kernel attends: SDPA, or two batched matmuls (block-diagonal queries)


@dataclass
class PrefillMeta:
    start: int
    end: int
    context: int  # tokens cached before this chunk
    blocks: torch.Tensor  # the row's blocks it reads (from its first window block to its end)
    mask: torch.Tensor | None  # [n, keys] bool; None: causal over the chunk alone
    gather: bool = True  # keys from the cache (``blocks``); False: the chunk's own k, v


@dataclass
class TorchMeta:
    num_tokens: int
    slot_mapping: torch.Tensor
    cos: torch.Tensor | None  # [T, 1, d]: (cos, cos)
    sin: torch.Tensor | None  # [T, 1, d]: (-sin, sin)
    decodes: list[DecodeMeta] = field(default_factory=list)
    prefills: list[PrefillMeta] = field(default_factory=list)
    positions: torch.Tensor | None = None  # int64 [T] (the fused backend rotates by position)

    @property
    def all_decode(self) -> bool:
        """Every token is a decode row, all in one decode pass (``token_idx`` None), no prompt chunk."""
        return len(self.decodes) == 1 and self.decodes[0].token_idx is None


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: DecoderConfig, *, block_size: int, device: torch.device, dtype: torch.dtype):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.block_size, self.device, self.dtype = block_size, torch.device(device), dtype
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.block_diag = cfg.num_kv_heads <= 4
        self._eye = torch.eye(cfg.num_kv_heads, dtype=dtype, device=self.device).view(
            1, cfg.num_kv_heads, 1, cfg.num_kv_heads, 1
        )
        self._buffers: dict[str, torch.Tensor] = {}
        self.packs_linears = _mkldnn_packing_ok(self.device, dtype)

    # -- linears ------------------------------------------------------------------------

    def pack_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """oneDNN's blocked layout for a ``[out, in]`` weight (CPU only)."""
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)

    def keeps_row_major(self, linear_bytes: int) -> bool:
        """Whether packed weights also keep their plain layout (see FusedCpuBackend)."""
        return False

    def linear(self, x, weight, bias=None):
        if self.packs_linears:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def decode_layers(self, layers, x, residual, kv_caches, meta):
        """Every decoder layer in one call, ``(x, residual)`` after the last; None:
        the model runs them one by one through these ops (always, here)."""
        return None

    # -- per step ------------------------------------------------------------------

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def prepare(self, batch: HostBatch, cos_sin_cache: torch.Tensor) -> TorchMeta:
        positions = self._tensor(batch.positions)
        cs = cos_sin_cache.index_select(0, positions)
        half = self.head_dim // 2
        cos, sin = cs[:, :half], cs[:, half:]
        meta = TorchMeta(
            num_tokens=batch.num_tokens,
            slot_mapping=self._tensor(batch.slot_mapping),
            cos=torch.cat((cos, cos), -1).unsqueeze(1).to(self.dtype),
            sin=torch.cat((-sin, sin), -1).unsqueeze(1).to(self.dtype),
        )
        is_decode = batch.query_lens == 1
        read_lens = batch.seq_lens - batch.read_start * self.block_size  # keys each row reads
        for rows in decode_groups(read_lens, np.nonzero(is_decode)[0], self.block_size):
            meta.decodes.append(self._decode_meta(batch, rows))
        for i in np.nonzero(~is_decode)[0]:
            meta.prefills.append(self._prefill_meta(batch, int(i)))
        return meta

    def _decode_meta(self, batch: HostBatch, rows: np.ndarray) -> DecodeMeta:
        bs = self.block_size
        seq_lens = batch.seq_lens[rows]
        first = batch.read_start[rows].astype(np.int64)
        rel = seq_lens - first * bs  # keys from the row's first read block on
        lo = np.zeros_like(rel) if not batch.sliding_window else np.maximum(seq_lens - batch.sliding_window, 0) - first * bs
        longest = int(rel.max())
        nbm = -(-longest // bs)
        sdpa = not self.block_diag or len(rows) < BMM_DECODE_MIN_ROWS
        if sdpa:  # mask each row's padding (and keys before its window), when rows differ
            mask = None
            if int(rel.min()) != longest or int(lo.max()) > 0:
                span = np.arange(longest)[None, :]
                mask = self._tensor(((span >= lo[:, None]) & (span < rel[:, None]))[:, None, None, :])
        else:
            span = np.arange(nbm * bs)[None, :]
            keep = (span >= lo[:, None]) & (span < rel[:, None])
            mask = self._tensor(np.where(keep, 0.0, -np.inf).astype(np.float32)[:, None, :])
        all_tokens = len(rows) == batch.num_tokens  # then rows are 0..T-1 in order
        if batch.first_blocks is None:
            table = batch.block_tables[rows, :nbm]
        else:  # each row's blocks from its first read one (holes before it are never indexed)
            k = np.arange(nbm)[None, :]
            used = -(-rel // bs)
            idx = np.minimum(first[:, None] + k, batch.block_tables.shape[1] - 1)
            table = batch.block_tables[rows[:, None], idx]
            table = np.where(k < used[:, None], table, table[:, :1])  # padding: the row's own first block
        return DecodeMeta(
            token_idx=None if all_tokens else self._tensor(batch.query_start_loc[rows].astype(np.int64)),
            block_idx=self._tensor(table.astype(np.int64).reshape(-1)),
            mask=mask,
            num_rows=len(rows),
            seq_len=longest,
            sdpa=sdpa,
        )

    def _prefill_meta(self, batch: HostBatch, i: int) -> PrefillMeta:
        start, end = int(batch.query_start_loc[i]), int(batch.query_start_loc[i + 1])
        ctx, seq_len = int(batch.context_lens[i]), int(batch.seq_lens[i])
        nblocks = -(-seq_len // self.block_size)
        w = batch.sliding_window
        first = int(batch.read_start[i])
        off = first * self.block_size  # position of the first key read
        q_pos = np.arange(ctx, seq_len)[:, None]
        k_pos = np.arange(off, seq_len)[None, :]
        mask = None
        if ctx:
            keep = k_pos <= q_pos
            mask = self._tensor(keep & (k_pos > q_pos - w) if w else keep)
        elif w and seq_len > w:  # a first chunk longer than the window: keys are the chunk's own
            mask = self._tensor((k_pos <= q_pos) & (k_pos > q_pos - w))
        blocks = self._tensor(batch.block_tables[i, first:nblocks].astype(np.int64))
        return PrefillMeta(start, end, ctx, blocks, mask, gather=bool(ctx))

    # -- elementwise ops ---------------------------------------------------------------

    def rms_norm(self, x, weight, eps):
        if x.shape[0] < RMS_NORM_SPLIT_ROWS:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        # many rows: the composite form (float32 statistics, as transformers' LlamaRMSNorm)
        # runs twice as fast as F.rms_norm's CPU kernel in bfloat16 at 2048 rows
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype).mul_(weight)

    def add_rms_norm(self, x, residual, weight, eps):
        residual = residual.add_(x)
        return self.rms_norm(residual, weight, eps), residual

    def silu_mul(self, gate_up):
        n = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :n]).mul_(gate_up[:, n:])

    def rope_qkv(self, qkv, meta: TorchMeta):
        """Split fused qkv; rotate q and k together (neox layout)."""
        t, h, kvh, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qk = qkv[:, : (h + kvh) * d].view(t, h + kvh, d)
        rot = torch.addcmul(qk * meta.cos, qk.roll(d // 2, -1), meta.sin)
        return rot[:, :h], rot[:, h:], qkv[:, (h + kvh) * d :].view(t, kvh, d)

    # -- attention --------------------------------------------------------------------

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)

    def attention(self, q, k, v, kv_cache, meta: TorchMeta):
        """q [T, H, d], k/v [T, KVH, d]; returns [T, H * d]."""
        t, d = meta.num_tokens, self.head_dim
        self._write_kv(k, v, kv_cache, meta.slot_mapping)
        if meta.all_decode:
            return self._decode(q, kv_cache, meta.decodes[0]).reshape(t, -1)
        out = q.new_empty((t, self.num_heads, d))
        for dec in meta.decodes:
            out.index_copy_(0, dec.token_idx, self._decode(q.index_select(0, dec.token_idx), kv_cache, dec))
        for p in meta.prefills:
            out[p.start : p.end] = self._prefill(q[p.start : p.end], k[p.start : p.end], v[p.start : p.end], kv_cache, p)
        return out.view(t, -1)

    def _write_kv(self, k, v, kv_cache, slots: torch.Tensor) -> None:
        kvh, d = self.num_kv_heads, self.head_dim
        kv_cache[0].view(-1, kvh, d).index_copy_(0, slots, k)
        kv_cache[1].view(-1, kvh, d).index_copy_(0, slots, v)

    def _gather(self, kv_cache, block_idx: torch.Tensor, key: str) -> torch.Tensor:
        """``[2, len(block_idx) * block_size, kvh, d]``: both K and V, one index_select."""
        nb = kv_cache.shape[1]
        flat = kv_cache.view(2, nb, -1)
        out = self._buffer(key, (2, block_idx.numel(), flat.shape[2]), kv_cache.dtype)
        torch.index_select(flat, 1, block_idx, out=out)
        return out.view(2, -1, self.num_kv_heads, self.head_dim)

    def _decode(self, q, kv_cache, m: DecodeMeta):
        """One new token per row, keys and values gathered from the rows' blocks.

        SDPA (few rows, or many KV heads): the query heads of each KV head are
        that head's "query length" (they share its keys and its mask), so no
        head is repeated. Many rows and few KV heads: two batched matmuls with
        block-diagonal queries (head h's query sits in head h's columns, the
        rest are zeros): every head's keys are read in one contiguous matmul,
        which beats SDPA's per-(row, head) tasks there."""
        b, h, kvh, g, d = m.num_rows, self.num_heads, self.num_kv_heads, self.group, self.head_dim
        kv = self._gather(kv_cache, m.block_idx, "decode")
        if m.sdpa:
            kv = kv.view(2, b, -1, kvh, d)[:, :, : m.seq_len]
            o = F.scaled_dot_product_attention(
                q.reshape(b, kvh, g, d), kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=m.mask, scale=self.scale
            )
            return o.reshape(b, h, d)
        kv = kv.view(2, b, -1, kvh * d)
        qb = (q.reshape(b, kvh, g, d).mul(self.scale).unsqueeze(3) * self._eye).view(b, h, kvh * d)
        s = torch.bmm(qb, kv[0].transpose(1, 2)).float().add_(m.mask)
        p = torch.softmax(s, -1).to(q.dtype)
        o = torch.bmm(p, kv[1]).view(b, kvh, g, kvh, d)
        return o.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(b, h, d)

    def _prefill(self, q, k, v, kv_cache, p: PrefillMeta):
        if not p.gather:
            keys, values = k, v
        else:
            kv = self._gather(kv_cache, p.blocks, "prefill")
            keys, values = kv[0, : p.mask.shape[1]], kv[1, : p.mask.shape[1]]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1)
