"""A converted copy of a GGUF checkpoint, so that start-up skips GGUF parsing.

Reading a GGUF's metadata takes seconds in pure Python (the ``gguf``
package walks every key and token string through numpy memmaps), and the
tokenizer and the weights each read it. ``convert(gguf)`` writes, once, a
Hugging Face directory under ``$FNLLM_CACHE/converted/<sha256 prefix>/``:

- ``config.json``, the GGUF's model config as it is, and
  ``fnllm_tokenizer.json``, the tokenizer's stop ids (a GGUF's
  end-of-generation tokens, which no Hugging Face file records);
- ``model.safetensors``: the tensors exactly as the GGUF path yields them
  (dequantized to float32, llama.cpp's q/k permutation undone), so a model
  loaded from the copy is bit-identical to one loaded from the GGUF;
- the tokenizer as transformers saves it (``tokenizer.json``, with the chat
  template in ``tokenizer_config.json``);
- ``source.json``: the GGUF's path, size, mtime and SHA-256.

``converted_dir(gguf)`` finds the copy through a small index keyed by the
file's resolved path, size and modification time (no hashing at start-up);
a copy whose source changed is ignored. ``FNLLM_GGUF_CACHE=0`` turns the
copy off. Writes go to a temporary directory renamed into place, so a
crashed conversion never leaves a half copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

INDEX = "index.json"
TOKENIZER_EXTRA = "fnllm_tokenizer.json"


def enabled() -> bool:
    return os.environ.get("FNLLM_GGUF_CACHE", "1") != "0"


def cache_root() -> Path:
    from fnllm.model.fetch import cache_dir

    return cache_dir() / "converted"


def _key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_index(root: Path) -> list[dict]:
    try:
        return json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return []


def converted_dir(gguf: str | os.PathLike) -> Path | None:
    """The converted copy of ``gguf``, when one exists for the file as it is now."""
    if not enabled():
        return None
    path = Path(gguf)
    try:
        key = _key(path)
    except OSError:
        return None
    root = cache_root()
    for entry in _read_index(root):
        if all(entry.get(k) == v for k, v in key.items()):
            d = root / entry["dir"]
            if (d / "source.json").is_file():
                return d
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hf_config(cfg, eos: list[int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "hidden_act": "silu", "torch_dtype": "float32",
    }


def _write(gguf: Path, out: Path, sha: str) -> None:
    from safetensors.torch import save_file

    from fnllm.model.gguf_loader import open_gguf
    from fnllm.tokenizer import load_tokenizer

    ckpt = open_gguf(gguf)
    tok = load_tokenizer(gguf)  # not yet converted: read from the GGUF itself
    (out / "config.json").write_text(json.dumps(_hf_config(ckpt.config, list(ckpt.config.eos_token_ids)), indent=1))
    # the tokenizer's own stop ids (a GGUF's end-of-generation tokens), read back by load_tokenizer
    (out / TOKENIZER_EXTRA).write_text(json.dumps({"eos_token_ids": list(tok.eos_token_ids)}))
    save_file({name: ref.read().contiguous() for name, ref in ckpt.tensors.items()}, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    (out / "source.json").write_text(json.dumps(dict(_key(gguf), sha256=sha)))


def convert(gguf: str | os.PathLike) -> Path:
    """Convert ``gguf`` (once; later calls return the existing copy)."""
    path = Path(gguf).resolve()
    found = converted_dir(path)
    if found is not None:
        return found
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    sha = _sha256(path)
    final = root / sha[:24]
    if not (final / "source.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            _write(path, tmp, sha)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    entries = [e for e in _read_index(root) if e.get("path") != str(path)]
    entries.append(dict(_key(path), dir=final.name))
    tmp_index = root / f".{INDEX}.tmp"
    tmp_index.write_text(json.dumps(entries, indent=1))
    tmp_index.replace(root / INDEX)
    return final
