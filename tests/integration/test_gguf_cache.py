"""The converted copy of the demo GGUF (made by set-up) is the same model:
identical tensors, identical tokenization and chat rendering, the same stop
ids; a copy whose source changed is never used."""

from __future__ import annotations

import json

import pytest
import torch

from fnllm.model import gguf_cache
from fnllm.model.loader import open_checkpoint
from fnllm.tokenizer import load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France? 你好 🚀"}]


@pytest.mark.slow
def test_converted_copy_is_the_same_model(smollm2_path, monkeypatch):
    copy = gguf_cache.converted_dir(smollm2_path) or gguf_cache.convert(smollm2_path)
    fast_ckpt, fast_tok = open_checkpoint(smollm2_path), load_tokenizer(smollm2_path)
    assert fast_ckpt.path == str(copy) and fast_tok.source == str(copy)
    monkeypatch.setenv("FNLLM_GGUF_CACHE", "0")
    ckpt, tok = open_checkpoint(smollm2_path), load_tokenizer(smollm2_path)
    assert ckpt.path == str(smollm2_path) and tok.source == str(smollm2_path)
    for text in ("Hello world", "北京是中国的 🤖", "def f(x):\n    return x"):
        assert fast_tok.encode(text) == tok.encode(text)
    assert fast_tok.apply_chat_template_ids(MESSAGES) == tok.apply_chat_template_ids(MESSAGES)
    assert fast_ckpt.config == ckpt.config and fast_tok.eos_token_ids == tok.eos_token_ids
    assert set(fast_ckpt.tensors) == set(ckpt.tensors)
    for name, ref in ckpt.tensors.items():
        assert torch.equal(fast_ckpt.tensors[name].read(), ref.read()), name


def test_a_copy_whose_source_changed_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("FNLLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(60))
    root = gguf_cache.cache_root()
    (root / "abc").mkdir(parents=True)
    (root / "abc" / "source.json").write_text("{}")
    (root / gguf_cache.INDEX).write_text(json.dumps([dict(gguf_cache._key(src), dir="abc")]))
    assert gguf_cache.converted_dir(src) == root / "abc"
    monkeypatch.setenv("FNLLM_GGUF_CACHE", "0")
    assert gguf_cache.converted_dir(src) is None
    monkeypatch.setenv("FNLLM_GGUF_CACHE", "1")
    src.write_bytes(b"GGUF" + bytes(61))  # a different file now: the copy is stale
    assert gguf_cache.converted_dir(src) is None
