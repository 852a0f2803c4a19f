"""Tensor- and pipeline-parallel sharding of the decoder (Megatron's split, vLLM's rules).

A rank's :class:`ShardSpec` says which part of the model it holds:

- column-parallel (split the output rows): q/k/v, gate/up, with their biases.
  Rank ``r`` of ``tp`` takes query heads ``[r*H/tp, (r+1)*H/tp)`` and the KV
  heads they read; when ``tp > num_kv_heads`` each KV head is replicated on
  ``tp / num_kv_heads`` consecutive ranks (vLLM's rule).
- row-parallel (split the input columns): o and down. Each rank's partial
  product is summed with one all-reduce; o's bias is added once, after it.
- vocab-parallel: the embedding and lm_head rows, ``ceil(V / tp)`` per rank
  (the last shard zero-padded). The embedding masks ids outside the shard and
  all-reduces; the lm_head's partial logits are gathered on TP rank 0, where
  sampling happens.
- pipeline stages: layers split evenly; when they do not divide, the extra
  layers go to the stages just before the last (vLLM's ``get_pp_indices``),
  which carries the lm_head. The first stage holds the embedding, the last the
  final norm and lm_head (and the embedding again when tied).
- norms are replicated.

:func:`source_slice` maps a checkpoint tensor name to the range of it this
rank loads (so a loader reads only that range: safetensors ``get_slice``, GGUF
row or column ranges); :func:`local_config` is the rank's model shape, which
the attention backends and KV cache are built from (its own heads only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fnllm.model.model_config import DecoderConfig


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Stage ``pp_rank``'s layers ``[start, end)``: even split, the remainder
    going one each to the stages before the last, nearest it first."""
    sizes = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        sizes[-(i + 2)] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def kv_head_range(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` rank ``tp_rank`` holds (one replicated head when tp > num_kv_heads)."""
    if tp_size >= num_kv_heads:
        head = tp_rank * num_kv_heads // tp_size
        return head, head + 1
    per = num_kv_heads // tp_size
    return tp_rank * per, (tp_rank + 1) * per


@dataclass(frozen=True)
class ShardSpec:
    """What one rank holds of a model of ``full`` shape."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    layer_start: int
    layer_end: int
    head_start: int
    num_heads: int
    kv_head_start: int
    num_kv_heads: int
    inter_start: int
    inter_size: int
    vocab_start: int
    vocab_shard: int  # padded: every TP rank holds the same number of rows
    vocab_size: int  # the full vocabulary

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def make_shard(cfg: DecoderConfig, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> ShardSpec:
    """Rank (tp_rank, pp_rank)'s shard. The engine checks the split first with
    ``ParallelConfig.verify_with_model`` (clear errors); here a shape that does
    not split is a ``ValueError`` too."""
    kv, h = cfg.num_kv_heads, cfg.num_heads
    if h % tp_size or cfg.intermediate_size % tp_size or (kv % tp_size if tp_size < kv else tp_size % kv) \
            or cfg.num_layers < pp_size:
        raise ValueError(f"a model of {h} heads, {kv} KV heads, intermediate size {cfg.intermediate_size} and "
                         f"{cfg.num_layers} layers does not split over TP {tp_size} x PP {pp_size}")
    start, end = pp_layer_range(cfg.num_layers, pp_rank, pp_size)
    heads = cfg.num_heads // tp_size
    kv_lo, kv_hi = kv_head_range(cfg.num_kv_heads, tp_rank, tp_size)
    inter = cfg.intermediate_size // tp_size
    vocab_shard = -(-cfg.vocab_size // tp_size)
    return ShardSpec(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size, layer_start=start, layer_end=end,
        head_start=tp_rank * heads, num_heads=heads, kv_head_start=kv_lo, num_kv_heads=kv_hi - kv_lo,
        inter_start=tp_rank * inter, inter_size=inter, vocab_start=tp_rank * vocab_shard, vocab_shard=vocab_shard,
        vocab_size=cfg.vocab_size,
    )


def local_config(cfg: DecoderConfig, shard: ShardSpec) -> DecoderConfig:
    """The shape of the rank's part: its heads, KV heads, MLP columns, layers, vocab rows."""
    return dataclasses.replace(
        cfg, num_heads=shard.num_heads, num_kv_heads=shard.num_kv_heads, intermediate_size=shard.inter_size,
        num_layers=shard.num_layers, vocab_size=shard.vocab_shard,
    )


@dataclass(frozen=True)
class Slice:
    """Load ``source.narrow(dim, lo, hi - lo)`` (dim None: the whole tensor)."""

    dim: int | None = None
    lo: int = 0
    hi: int = 0


def _holds_embedding(cfg: DecoderConfig, s: ShardSpec) -> bool:
    return s.is_first or (cfg.tie_word_embeddings and s.is_last)


def source_slice(cfg: DecoderConfig, s: ShardSpec, name: str) -> Slice | None:
    """The part of checkpoint tensor ``name`` (HF naming) rank ``s`` loads; None: not on this rank."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        here = _holds_embedding(cfg, s) if name == "model.embed_tokens.weight" else s.is_last
        return Slice(0, s.vocab_start, min(s.vocab_start + s.vocab_shard, cfg.vocab_size)) if here else None
    if name == "model.norm.weight":
        return Slice() if s.is_last else None
    layer = int(name.split(".")[2])
    if not s.layer_start <= layer < s.layer_end:
        return None
    d = cfg.head_dim
    if ".q_proj." in name:
        return Slice(0, s.head_start * d, (s.head_start + s.num_heads) * d)
    if ".k_proj." in name or ".v_proj." in name:
        return Slice(0, s.kv_head_start * d, (s.kv_head_start + s.num_kv_heads) * d)
    if ".o_proj.weight" in name:
        return Slice(1, s.head_start * d, (s.head_start + s.num_heads) * d)
    if ".gate_proj." in name or ".up_proj." in name:
        return Slice(0, s.inter_start, s.inter_start + s.inter_size)
    if ".down_proj." in name:
        return Slice(1, s.inter_start, s.inter_start + s.inter_size)
    return Slice()  # norms, o_proj.bias: replicated


# -- the forward's parallel pieces --------------------------------------------------------


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, s: ShardSpec, groups) -> torch.Tensor:
    """Embed with this rank's vocabulary rows; ids outside them give zeros; sum over TP."""
    from fnllm.distributed import tp_all_reduce

    local = ids - s.vocab_start
    outside = (local < 0) | (local >= s.vocab_shard)
    x = F.embedding(local.masked_fill(outside, 0), weight)
    x.masked_fill_(outside.unsqueeze(-1), 0)
    return tp_all_reduce(x, groups)


def row_parallel_reduce(x: torch.Tensor, bias: torch.Tensor | None, groups) -> torch.Tensor:
    """Sum the row-parallel partial products over TP, then add the (replicated) bias once."""
    from fnllm.distributed import tp_all_reduce

    x = tp_all_reduce(x, groups)
    return x if bias is None else x.add_(bias)


def gather_vocab_logits(local: torch.Tensor, s: ShardSpec, groups) -> torch.Tensor | None:
    """Full logits ``[rows, vocab]`` on TP rank 0 (where sampling happens); None on the others."""
    from fnllm.distributed import tp_gather

    parts = tp_gather(local, groups)
    if parts is None:
        return None
    return torch.cat(parts, dim=-1)[:, : s.vocab_size]
