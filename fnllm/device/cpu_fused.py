"""The torch backend on CPU with fused kernels (:mod:`fnllm.device.cpu_kernels`).

Same functions as :class:`~fnllm.device.cpu.TorchBackend`, fewer passes:
``add_rms_norm``, ``silu_mul``, the rotary and the K/V cache write are one
kernel call each instead of 2-8 ATen ops, and decode rows attend with a paged
kernel that reads each row's keys and values in place through its block table
(one task per row, or per run of query heads when there are fewer rows than
threads; float32 softmax), so nothing is gathered into a buffer.
With a sliding window the kernel reads each row's last ``window`` keys
only, from the block holding the first of them (holes before it are never
indexed). Prompt chunks keep the eager path (SDPA), except short rows after a cached
context (speculative decoding's verify rows, at most ``VERIFY_MAX_QUERY``
tokens): each of their tokens attends as a decode row whose length ends at
its own position (the KV of the whole row is written before attention). Selected by ``get_attn_backend``
for ``torch`` on CPU in float32/bfloat16 when the kernels build;
``FNLLM_CPU_KERNELS=0`` keeps the eager backend.

Linears: steps of at most ``SMALL_LINEAR_MAX_ROWS`` tokens (batch-1 decode)
stream the plain row-major weights through ``small_linear`` at close to memory
bandwidth (oneDNN's packed GEMV reads them at about half): the model keeps its
plain weights and the backend their packed copies (``hold_packed``), while the
plain ones total at most ``SMALL_LINEAR_MAX_BYTES``; above that the model's
weights are replaced by packed ones. Larger steps use oneDNN's packed GEMM.
Such a few-token step whose every token is a decode row runs all its decoder
layers in one kernel call (``decode_layers``, ``csrc/decode_layers.cpp``):
the same kernels in the same order, so the same values, without returning
to Python between them.

``batch_invariant=True`` (vLLM's ``VLLM_BATCH_INVARIANT`` idea): a token's
result does not depend on what else is in its step. Norms, rotary and SiLU
are already per row (each row reduced whole, in one fixed order, by one
thread). Attention: every token, prompt chunks included, goes through the
paged kernel as a row of its own (its length: the tokens before it plus
itself), so its scores and values are reduced block by block in position
order whatever the batch, the chunking or the prefix-cache hits. Linears:
oneDNN's packed GEMM gives each row the same result for any number of rows
from 2 up (checked by the tests on the model's shapes), but a single row goes
through a GEMV that sums in another order, so a lone row is computed as two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from fnllm.device.batch import HostBatch
from fnllm.device.cpu import TorchBackend, TorchMeta


@dataclass
class PagedDecodeMeta:
    token_idx: torch.Tensor | None  # flat token index of each decode row; None: all tokens, in order
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]


VERIFY_MAX_QUERY = 16  # rows of at most this many new tokens, after a cached context, attend as decode rows
SMALL_LINEAR_MAX_ROWS = 4  # steps of at most this many tokens stream the plain weights (small_linear)
SMALL_LINEAR_MAX_BYTES = 2 << 30  # plain copies kept beside oneDNN's packed weights: at most this much


class FusedCpuBackend(TorchBackend):
    name = "torch"

    def __init__(self, cfg, *, block_size: int, device, dtype, kernels, batch_invariant: bool = False):
        super().__init__(cfg, block_size=block_size, device=device, dtype=dtype)
        self.k = kernels
        self.batch_invariant = batch_invariant
        self._cos_sin: torch.Tensor | None = None
        self._window = 0  # the current batch's sliding window (0: none)
        self.small_linear = (not batch_invariant and dtype in (torch.bfloat16, torch.float32)
                             and hasattr(kernels, "small_linear") and os.environ.get("FNLLM_SMALL_LINEAR", "1") != "0")
        self._packed: dict | None = None  # id(plain weight) -> its packed copy, when the model keeps plain weights

    def hold_packed(self, weights, lazy: bool = False) -> None:
        """The model keeps its plain weights (``small_linear`` reads them) and the
        backend holds their oneDNN-packed copies: packed now, or with ``lazy``
        each the first time a step of more than ``SMALL_LINEAR_MAX_ROWS`` tokens
        needs it (the same packed weight, hence the same numbers): a one-shot run
        of short steps never pays the packing (``FNLLM_PACK_LINEAR=lazy``; the
        CLI's ``generate`` sets it). The weights live as long as the backend."""
        self._packed = {} if lazy else {id(w): self.pack_weight(w) for w in weights}

    def keeps_row_major(self, linear_bytes: int) -> bool:
        """Few-row steps (batch-1 decode) read the plain weights with ``small_linear``
        at close to memory bandwidth, where oneDNN's packed GEMV reads them at about
        half; the plain copies cost the layers' weight bytes again, so only up to
        ``SMALL_LINEAR_MAX_BYTES`` (``FNLLM_SMALL_LINEAR=0`` turns it off)."""
        return self.small_linear and linear_bytes <= SMALL_LINEAR_MAX_BYTES

    def linear(self, x, weight, bias=None):
        if self.batch_invariant and x.shape[0] == 1:  # a lone row as two: the GEMM's summation order
            return super().linear(x.expand(2, -1).contiguous(), weight, bias)[:1]
        if self._streams(x.shape[0]):
            return self.k.small_linear(x.contiguous(), weight, bias)  # `weight` is the plain one
        if self._packed is not None:
            packed = self._packed.get(id(weight))
            if packed is None:  # lazy: first needed now
                packed = self._packed[id(weight)] = self.pack_weight(weight)
            weight = packed
        return super().linear(x, weight, bias)

    def _streams(self, rows: int) -> bool:
        """Whether a step of ``rows`` tokens multiplies by the plain weights (``small_linear``)."""
        plain_at_hand = self._packed is not None or not self.packs_linears
        return self.small_linear and rows <= SMALL_LINEAR_MAX_ROWS and plain_at_hand

    def decode_layers(self, layers, x, residual, kv_caches, meta: TorchMeta):
        """A step whose every token is a decode row and whose linears stream the
        plain weights (batch-1 decode): all layers in one kernel call
        (``csrc/decode_layers.cpp``), the same kernels in the same order as
        the layer-by-layer path, so the same values; None for any other step."""
        if not meta.all_decode or not self._streams(meta.num_tokens):
            return None
        d = meta.decodes[0]
        params = [p for layer in layers for p in layer.decode_params()]
        return self.k.decode_layers(x.contiguous(), residual, params, kv_caches, meta.positions, self._cos_sin,
                                    meta.slot_mapping, d.block_tables, d.seq_lens, self.num_heads, self.num_kv_heads,
                                    layers[0].cfg.rms_norm_eps, self.scale, self._window)  # [x, residual]

    def prepare(self, batch: HostBatch, cos_sin_cache: torch.Tensor) -> TorchMeta:
        if self._cos_sin is None:
            self._cos_sin = cos_sin_cache.float().contiguous()
        meta = TorchMeta(num_tokens=batch.num_tokens, slot_mapping=self._tensor(batch.slot_mapping), cos=None, sin=None,
                         positions=self._tensor(batch.positions.astype(np.int64)))
        self._window = batch.sliding_window or 0  # each token's row reads its own last window keys
        if self.batch_invariant:
            meta.decodes.append(self._per_token_meta(batch))
            return meta
        q = batch.query_lens
        # short rows over a cached context (speculative verify rows, small chunks) attend
        # token by token like decode rows: token j of such a row is a decode row of length pos_j + 1
        as_decode = (q == 1) | ((q <= VERIFY_MAX_QUERY) & (batch.context_lens > 0))
        if as_decode.all() and int(q.max(initial=1)) == 1:
            toks, tok_rows = np.arange(batch.num_tokens), np.arange(batch.num_rows)
        else:
            row_of = np.repeat(np.arange(batch.num_rows), q)
            toks = np.nonzero(as_decode[row_of])[0]
            tok_rows = row_of[toks]
        if len(toks):
            seq_lens = batch.positions[toks] + 1
            nbm = -(-int(seq_lens.max()) // self.block_size)
            all_tokens = len(toks) == batch.num_tokens
            meta.decodes.append(PagedDecodeMeta(
                token_idx=None if all_tokens else self._tensor(toks.astype(np.int64)),
                block_tables=self._tensor(batch.block_tables[tok_rows, :nbm].astype(np.int32)),
                seq_lens=self._tensor(seq_lens.astype(np.int32)),
            ))
        for i in np.nonzero(~as_decode)[0]:
            meta.prefills.append(self._prefill_meta(batch, int(i)))
        return meta

    def _per_token_meta(self, batch: HostBatch) -> PagedDecodeMeta:
        """Every token a paged-attention row: its row's block table, and as its
        length its position + 1 (its own K/V are written before attention)."""
        row_of = np.repeat(np.arange(batch.num_rows), batch.query_lens)
        lens = batch.positions.astype(np.int64) + 1
        nbm = -(-int(lens.max()) // self.block_size) if len(lens) else 1
        return PagedDecodeMeta(token_idx=None, block_tables=self._tensor(batch.block_tables[row_of, :nbm].astype(np.int32)),
                               seq_lens=self._tensor(lens.astype(np.int32)))

    def rms_norm(self, x, weight, eps):
        return self.k.add_rms_norm(None, x.contiguous(), weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.k.add_rms_norm(x.contiguous(), residual, weight, eps), residual

    def silu_mul(self, gate_up):
        return self.k.silu_mul(gate_up.contiguous())

    def rope_qkv(self, qkv, meta: TorchMeta):
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = qkv.contiguous()
        q, k = self.k.rope(qkv, meta.positions, self._cos_sin, h, kvh)
        return q, k, qkv[:, (h + kvh) * d :].view(-1, kvh, d)

    def _write_kv(self, k, v, kv_cache, slots: torch.Tensor) -> None:
        self.k.write_kv(k, v, kv_cache, slots)

    def _decode(self, q, kv_cache, m: PagedDecodeMeta):
        return self.k.paged_decode(q.contiguous(), kv_cache, m.block_tables, m.seq_lens, self.scale, self._window)
