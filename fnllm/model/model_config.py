"""The decoder's architecture, read from a Hugging Face ``config.json`` dict.

:class:`DecoderConfig` is frozen and validated: a config that names an unknown
architecture, lacks a required key or holds values that cannot describe a
Llama-family decoder raises :class:`CheckpointError` (a ``ValueError``)
naming the file and the key. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Mistral is the Llama decoder plus ``sliding_window`` (attention to the last
# W positions only); all three run the same code (fnllm.model.pangu)
ARCHITECTURES = ("PanguEmbeddedForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


class CheckpointError(ValueError):
    """A model checkpoint that cannot be loaded; the message names the file and key."""


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # a token attends to the last W positions (itself included); None: all

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_block_bytes(self, block_size: int, element_size: int) -> int:
        """Bytes one KV block takes over all layers (K and V)."""
        return 2 * block_size * self.num_kv_heads * self.head_dim * element_size * self.num_layers


def _int(d: dict, key: str, source: str, low: int = 1) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise CheckpointError(f"{source}: key {key!r} must be an integer >= {low}, got {v!r}")
    return v


def _rope_theta(d: dict, source: str) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{source}: rope type {kind!r} is not supported (only default RoPE)")
    theta = d.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{source}: missing config key 'rope_theta'")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{source}: key 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def _eos(d: dict, source: str) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    if not all(isinstance(t, int) and 0 <= t < d["vocab_size"] for t in eos):
        raise CheckpointError(f"{source}: key 'eos_token_id' holds ids outside the vocabulary: {eos!r}")
    return eos


def _sliding_window(d: dict, source: str) -> int | None:
    """``sliding_window`` (Mistral's key; null or absent: full attention).
    Qwen2-style configs that carry a window but ``use_sliding_window: false``
    do not use it."""
    w = d.get("sliding_window")
    if w is None or d.get("use_sliding_window", True) is False:
        return None
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise CheckpointError(f"{source}: key 'sliding_window' must be a positive integer or null, got {w!r}")
    return w


def _architecture(d: dict, source: str) -> str:
    archs = d.get("architectures")
    if not archs or not isinstance(archs, list):
        raise CheckpointError(f"{source}: missing config key 'architectures'")
    if archs[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unknown architecture {archs[0]!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    return archs[0]


def decoder_config_from_dict(d: dict[str, Any], source: str) -> DecoderConfig:
    """Validate a ``config.json`` dict (``source`` names the file in errors)."""
    arch = _architecture(d, source)
    for key in REQUIRED_KEYS:
        if key not in d:
            raise CheckpointError(f"{source}: missing config key {key!r}")
    heads = _int(d, "num_attention_heads", source)
    kv_heads = _int(d, "num_key_value_heads", source) if d.get("num_key_value_heads") else heads
    hidden = _int(d, "hidden_size", source)
    if not d.get("head_dim") and hidden % heads:
        raise CheckpointError(
            f"{source}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
            "and no head_dim is given"
        )
    head_dim = _int(d, "head_dim", source) if d.get("head_dim") else hidden // heads
    if heads % kv_heads or head_dim % 2:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
            f"({kv_heads}) and head_dim ({head_dim}) even"
        )
    if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias", False):
        raise CheckpointError(f"{source}: only a SiLU MLP without bias is supported")
    eps = d["rms_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise CheckpointError(f"{source}: key 'rms_norm_eps' must be a positive number, got {eps!r}")
    return DecoderConfig(
        architecture=arch,
        vocab_size=_int(d, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size", source),
        num_layers=_int(d, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        rope_theta=_rope_theta(d, source),
        max_position_embeddings=_int(d, "max_position_embeddings", source),
        attention_bias=bool(d.get("bias", d.get("attention_bias", False))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos(d, source),
        sliding_window=_sliding_window(d, source),
    )


class ModelFacts:
    """What the engine reads of the model through an executor (``self.config``
    is the checkpoint's :class:`DecoderConfig`): shared by the in-process and
    the distributed executors."""

    config: DecoderConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self.config.eos_token_ids[0] if self.config.eos_token_ids else None

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings
