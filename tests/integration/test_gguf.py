"""GGUF reading on a tiny Llama written the way llama.cpp's converter writes
it (renamed tensors, q/k rows permuted, tied output): fnllm must undo it and
match transformers; an unknown GGUF architecture is refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from fnllm.device.executor import ModelExecutor
from integration_support import LLAMA, Driver, Seq, make_plan, reference_logits, tokens

NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_tiny_gguf(path, model) -> None:
    c = LLAMA
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = t.float().numpy()
        if ".q_proj." in name:
            a = llama_cpp_permute(a, c["num_attention_heads"])
        elif ".k_proj." in name:
            a = llama_cpp_permute(a, c["num_key_value_heads"])
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_llama_gguf_matches_reference(tiny_llama, tmp_path):
    _, hf = tiny_llama
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    ex = ModelExecutor(path, device="cpu", num_blocks=16, block_size=8)
    assert ex.gguf_path == str(path) and ex.config.tie_word_embeddings and ex.eos_token_ids == (2,)
    seq = Seq(tokens(30, 61))
    logits = ex.compute_logits(make_plan([Driver(16, 8).row(seq, 30)]))
    torch.testing.assert_close(logits[0], reference_logits(hf, seq.tokens)[-1], atol=1e-4, rtol=1e-4)


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="other.gguf: unknown GGUF architecture 'gpt2'"):
        ModelExecutor(path, device="cpu", num_blocks=4)


def test_default_model_path_says_how_to_fetch(tmp_path, monkeypatch):
    from fnllm.model.fetch import default_model_path

    monkeypatch.setenv("FNLLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m fnllm\.model\.fetch"):
        default_model_path()
