"""GGUF checkpoints (llama.cpp): config from metadata, dequantized tensors.

Tensor names map from llama.cpp's (``blk.N.attn_q.weight``) to Hugging Face's
(``model.layers.N.self_attn.q_proj.weight``). llama.cpp's converter permutes
the rows of q and k for Llama (each head's rows ``[2, head_dim/2]`` become
interleaved pairs ``[head_dim/2, 2]``); reading undoes it: view each head's
rows as ``[head_dim/2, 2]`` and swap the two axes back. Quantized tensors (Q4_1, Q8_0, ...)
are dequantized to float32 with ``gguf.quants.dequantize``, one at a time.
A shard reads a row range (the quantized rows themselves, then dequantized)
or a column range (whole quantization blocks when the range is aligned to
them, else the dequantized tensor's columns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fnllm.model.loader import Checkpoint, TensorRef
from fnllm.model.model_config import CheckpointError, decoder_config_from_dict

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# config.json key -> GGUF metadata key (after the "<arch>." prefix)
CONFIG_KEYS = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "vocab_size": "vocab_size",
    "head_dim": "rope.dimension_count",
}


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] in TOP_NAMES and len(parts) == 2:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reverse llama.cpp's q/k row permutation (weights or biases)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _config_dict(reader, path: Path, tensor_names: set[str]) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown GGUF architecture {arch!r} (supported: {list(GGUF_ARCHITECTURES)})")
    d: dict = {"architectures": [GGUF_ARCHITECTURES[arch]]}
    for hf_key, key in CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            d[hf_key] = value
    if "vocab_size" not in d and _field(reader, "tokenizer.ggml.tokens") is not None:
        d["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    d["tie_word_embeddings"] = "output.weight" not in tensor_names
    d["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    d["bos_token_id"] = _field(reader, "tokenizer.ggml.bos_token_id")
    d["eos_token_id"] = _field(reader, "tokenizer.ggml.eos_token_id")
    return d


def _reader_fn(tensor, perm_heads: int | None):
    def read() -> torch.Tensor:
        from gguf import quants

        w = quants.dequantize(tensor.data, tensor.tensor_type)
        if perm_heads:
            w = unpermute_qk(w, perm_heads)
        return torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))

    return read


def _slice_reader_fn(tensor, perm_heads: int | None):
    def read(dim: int, lo: int, hi: int) -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES, quants

        data, qtype = tensor.data, tensor.tensor_type
        block, size = GGML_QUANT_SIZES[qtype]
        if dim == 0:
            w = quants.dequantize(data[lo:hi], qtype)
            if perm_heads:  # slices are head-aligned: unpermute the heads they hold
                w = unpermute_qk(w, (hi - lo) // (data.shape[0] // perm_heads))
        elif block == 1:
            w = quants.dequantize(data[:, lo:hi], qtype)
        elif lo % block == 0 and hi % block == 0:
            w = quants.dequantize(data[:, lo // block * size : hi // block * size], qtype)
        else:
            w = quants.dequantize(data, qtype)[:, lo:hi]
        return torch.from_numpy(np.require(w, dtype=np.float32, requirements=["C", "W"]))

    return read


def open_gguf(path: Path) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise CheckpointError(f"{path}: malformed or truncated GGUF file ({type(e).__name__}: {e})") from None
    names = {t.name for t in reader.tensors}
    cfg = decoder_config_from_dict(_config_dict(reader, path, names), str(path))
    size = path.stat().st_size
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r}")
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated GGUF file (tensor {t.name!r} ends past the file)")
        perm = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads if ".attn_k." in t.name else None
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        tensors[name] = TensorRef(str(path), shape, _reader_fn(t, perm), _slice_reader_fn(t, perm))
    return Checkpoint(str(path), cfg, tensors, gguf_path=str(path))
