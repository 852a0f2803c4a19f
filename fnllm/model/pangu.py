"""PanguEmbedded decoder (and Llama, the same code without bias).

A Llama-family decoder: RMSNorm, GQA attention with RoPE (neox layout, the
checkpoint's ``rope_theta``), optional bias on q/k/v/o, SwiGLU MLP, tied or
untied embeddings. q/k/v and gate/up are held fused (one matmul each); the
Hugging Face names map onto row slices of the fused weights
(:func:`expected_tensors`, :meth:`PanguEmbeddedForCausalLM.load_tensor`).

The forward runs on a flat batch of ``T`` tokens; every linear, norm, rotary
and attention op goes through ``ops`` (an attention backend), which owns the
paged KV layout and may repack the projection weights for its device
(:meth:`PanguEmbeddedForCausalLM.repack_linears`; then ``load_tensor`` no
longer applies). Logits are computed only for the ``logits_indices`` rows.

Sharded (``shard``, :mod:`fnllm.model.parallel`): the model holds only its
rank's heads, MLP columns, vocabulary rows and pipeline layers (``cfg`` is
then the rank's local shape, ``full_cfg`` the checkpoint's); o and down end
with an all-reduce over the TP group, the embedding and lm_head are
vocab-parallel. Without a shard nothing of that runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnllm.model.model_config import DecoderConfig
from fnllm.model.parallel import (
    ShardSpec, gather_vocab_logits, local_config, row_parallel_reduce, source_slice, vocab_parallel_embedding,
)


def expected_tensors(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, Hugging Face names, with shapes."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    proj = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        for name, rows in proj.items():
            out[p + f"self_attn.{name}.weight"] = (rows, h)
            if cfg.attention_bias:
                out[p + f"self_attn.{name}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.attention_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    return out


def ignorable_tensor(cfg: DecoderConfig, name: str) -> bool:
    """Tensors a checkpoint may carry that the model does not use."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype, device, tp_groups=None):
        super().__init__()
        self.tp = tp_groups  # the TP groups when the layer is split over several ranks
        h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
        kw = dict(dtype=dtype, device=device)
        self.qkv_weight = _param(q + 2 * kv, h, **kw)
        self.qkv_bias = _param(q + 2 * kv, **kw) if cfg.attention_bias else None
        self.o_weight = _param(h, q, **kw)
        self.o_bias = _param(h, **kw) if cfg.attention_bias else None
        self.gate_up_weight = _param(2 * cfg.intermediate_size, h, **kw)
        self.down_weight = _param(h, cfg.intermediate_size, **kw)
        self.input_norm = _param(h, **kw)
        self.post_norm = _param(h, **kw)
        self.cfg = cfg

    def forward(self, x, residual, kv_cache, meta, ops):
        cfg = self.cfg
        if residual is None:
            residual, x = x, ops.rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        else:
            x, residual = ops.add_rms_norm(x, residual, self.input_norm, cfg.rms_norm_eps)
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = ops.rope_qkv(qkv, meta)
        attn = ops.attention(q, k, v, kv_cache, meta)
        if self.tp is None:
            x = ops.linear(attn, self.o_weight, self.o_bias)
        else:  # row-parallel: partial sums, one all-reduce, the bias once
            x = row_parallel_reduce(ops.linear(attn, self.o_weight), self.o_bias, self.tp)
        x, residual = ops.add_rms_norm(x, residual, self.post_norm, cfg.rms_norm_eps)
        gate_up = ops.linear(x, self.gate_up_weight)
        x = ops.silu_mul(gate_up)
        x = ops.linear(x, self.down_weight)
        return (x if self.tp is None else row_parallel_reduce(x, None, self.tp)), residual

    LINEARS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")

    def decode_params(self) -> tuple:
        """The layer's tensors in the order a backend's one-call ``decode_layers`` takes them."""
        return (self.qkv_weight, self.qkv_bias, self.o_weight, self.o_bias, self.gate_up_weight, self.down_weight,
                self.input_norm, self.post_norm)


class PanguEmbeddedForCausalLM(nn.Module):
    """The decoder; also serves ``LlamaForCausalLM`` checkpoints."""

    def __init__(self, cfg: DecoderConfig, dtype=torch.float32, device="cpu", shard: ShardSpec | None = None,
                 groups=None):
        super().__init__()
        self.full_cfg, self.shard, self.groups = cfg, shard, groups
        cfg = self.cfg = local_config(cfg, shard) if shard is not None else cfg
        tp = groups if shard is not None and shard.tp_size > 1 else None
        self.tp = tp
        first, last = shard is None or shard.is_first, shard is None or shard.is_last
        kw = dict(dtype=dtype, device=device)
        embed = first or (cfg.tie_word_embeddings and last)
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, **kw) if embed else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device, tp) for _ in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, **kw) if last else None
        self.lm_head = None
        if last:
            tied = cfg.tie_word_embeddings
            self.lm_head = self.embed_tokens if tied else _param(cfg.vocab_size, cfg.hidden_size, **kw)
        if shard is not None and shard.vocab_start + shard.vocab_shard > shard.vocab_size:
            with torch.no_grad():  # the last vocab shard's padding rows: zeros, never read as tokens
                for p in (self.embed_tokens, self.lm_head):
                    if p is not None:
                        p[shard.vocab_size - shard.vocab_start:].zero_()
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(cfg, device), persistent=False)

    # -- weights -----------------------------------------------------------------

    def _target(self, name: str) -> torch.Tensor:
        """The parameter slice a Hugging Face tensor name loads into."""
        cfg = self.cfg
        if name == "model.embed_tokens.weight":
            return self.embed_tokens if self.embed_tokens is not None else self.lm_head
        if name == "model.norm.weight":
            return self.norm
        if name == "lm_head.weight":
            return self.lm_head
        parts = name.split(".")  # model.layers.N.<module>.<proj>.<kind>
        layer = self.layers[int(parts[2]) - (self.shard.layer_start if self.shard is not None else 0)]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        qkv_rows = {"self_attn.q_proj": (0, q), "self_attn.k_proj": (q, q + kv), "self_attn.v_proj": (q + kv, q + 2 * kv)}
        if module in qkv_rows:
            lo, hi = qkv_rows[module]
            return (layer.qkv_weight if kind == "weight" else layer.qkv_bias)[lo:hi]
        if module == "self_attn.o_proj":
            return layer.o_weight if kind == "weight" else layer.o_bias
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            return layer.gate_up_weight[:i] if module == "mlp.gate_proj" else layer.gate_up_weight[i:]
        simple = {"mlp.down_proj": layer.down_weight, "input_layernorm": layer.input_norm,
                  "post_attention_layernorm": layer.post_norm}
        return simple[module]

    @torch.no_grad()
    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (any float dtype) into its place."""
        self._target(name).copy_(tensor)

    @torch.no_grad()
    def load_ref(self, name: str, ref) -> None:
        """Load checkpoint tensor ``name`` from a :class:`~fnllm.model.loader.TensorRef`,
        reading only the range this rank holds (nothing when it holds none)."""
        if self.shard is None:
            return self.load_tensor(name, ref.read())
        part = source_slice(self.full_cfg, self.shard, name)
        if part is None:
            return None
        if part.dim is None:
            return self.load_tensor(name, ref.read())
        self._target(name).narrow(part.dim, 0, part.hi - part.lo).copy_(ref.read_slice(part.dim, part.lo, part.hi))

    # -- forward -----------------------------------------------------------------

    def forward(self, input_ids, kv_caches, meta, ops, logits_indices, hidden=None):
        """Run ``T`` tokens; return logits ``[len(logits_indices), vocab]``
        for the selected token rows, in the model's dtype (sampling converts
        only the rows that need it: a greedy argmax is the same either way).

        Pipeline stages: a later stage takes ``hidden = (x, residual)`` from the
        one before instead of embedding; a stage before the last returns its
        ``(x, residual)``. Under TP only TP rank 0 gets the logits (None elsewhere)."""
        if hidden is not None:
            x, residual = hidden
        else:
            x = F.embedding(input_ids, self.embed_tokens) if self.tp is None else \
                vocab_parallel_embedding(input_ids, self.embed_tokens, self.shard, self.tp)
            residual = None
        fused = None if self.tp is not None else ops.decode_layers(self.layers, x, residual, kv_caches, meta)
        if fused is not None:  # the backend ran every layer in one call (the same kernels, the same values)
            x, residual = fused
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                x, residual = layer(x, residual, kv_cache, meta, ops)
        if self.norm is None:
            return x, residual
        if logits_indices is None or logits_indices.numel() == 0:
            return x.new_empty((0, self.full_cfg.vocab_size))
        x = x.index_select(0, logits_indices)
        residual = residual.index_select(0, logits_indices)
        x, _ = ops.add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps)
        logits = ops.linear(x, self.lm_head)
        return logits if self.tp is None else gather_vocab_logits(logits, self.shard, self.tp)

    @torch.no_grad()
    def repack_linears(self, pack) -> None:
        """Replace every projection weight (and the lm_head) by ``pack(weight)``,
        a device-preferred layout only ``ops.linear`` understands. A tied
        lm_head gets its own packed copy; the embedding stays plain."""
        for layer in self.layers:
            for name in DecoderLayer.LINEARS:
                setattr(layer, name, nn.Parameter(pack(getattr(layer, name)), requires_grad=False))
        if self.lm_head is not None:
            self.lm_head = nn.Parameter(pack(self.lm_head), requires_grad=False)

    def linear_weights(self):
        """Every weight ``ops.linear`` multiplies by: the layers' projections and the lm_head."""
        for layer in self.layers:
            yield from (getattr(layer, name) for name in DecoderLayer.LINEARS)
        if self.lm_head is not None:
            yield self.lm_head

    def linear_bytes(self) -> int:
        """Bytes of the decoder layers' projection weights (the lm_head aside)."""
        return sum(getattr(layer, n).nbytes for layer in self.layers for n in DecoderLayer.LINEARS)


LlamaForCausalLM = PanguEmbeddedForCausalLM
MistralForCausalLM = PanguEmbeddedForCausalLM  # the window lives in the attention backend (DecoderConfig.sliding_window)
MODEL_CLASSES = {"PanguEmbeddedForCausalLM": PanguEmbeddedForCausalLM, "LlamaForCausalLM": LlamaForCausalLM,
                 "MistralForCausalLM": MistralForCausalLM}


def rope_cos_sin_cache(cfg: DecoderConfig, device) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos of each frequency, then sin
    (the layout torch_npu's rotary kernels and vLLM use)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
