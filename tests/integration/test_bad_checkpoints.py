"""Malformed checkpoints fail at load, before the model is allocated, with a
ValueError naming the file and the tensor or key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fnllm.model.loader as loader
from fnllm.device.executor import ModelExecutor, num_blocks_for_memory

FIRST = "model-00001-of-00002.safetensors"
SECOND = "model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt(tiny_pangu, tmp_path, monkeypatch):
    """A private copy of the tiny Pangu checkpoint; allocating a model fails loudly."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_pangu[0], root)

    class NoAlloc:
        def __init__(self, *a, **k):
            raise AssertionError("the model was allocated before the checkpoint was validated")

    monkeypatch.setattr(loader, "MODEL_CLASSES", {k: NoAlloc for k in loader.MODEL_CLASSES})
    return root


def edit_config(root, **changes):
    cfg = json.loads((root / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (root / "config.json").write_text(json.dumps(cfg))


def edit_shard(root, file, fn):
    tensors = load_file(str(root / file))
    fn(tensors)
    save_file(tensors, str(root / file))


def edit_index(root, fn):
    index = json.loads((root / "model.safetensors.index.json").read_text())
    fn(index["weight_map"])
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_of(root, name):
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][name]


def load(path):
    return ModelExecutor(path, device="cpu", num_blocks=4, block_size=16)


def test_good_copy_validates(ckpt):
    assert loader.open_checkpoint(ckpt).config.num_layers == 2


def test_generation_config_eos_merged(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert loader.load_config(ckpt).eos_token_ids == (2, 7)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        load(ckpt)


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON"):
        load(ckpt)


def test_missing_config_key(ckpt):
    edit_config(ckpt, hidden_size=None)
    with pytest.raises(ValueError, match=r"config\.json: missing config key 'hidden_size'"):
        load(ckpt)


def test_unknown_architecture(ckpt):
    edit_config(ckpt, architectures=["MysteryForCausalLM"])
    with pytest.raises(ValueError, match="unknown architecture 'MysteryForCausalLM'"):
        load(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.1.mlp.up_proj.weight"
    edit_shard(ckpt, shard_of(ckpt, name), lambda t: t.pop(name))
    edit_index(ckpt, lambda m: m.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    edit_shard(ckpt, SECOND, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    edit_index(ckpt, lambda m: m.update({"model.layers.0.extra.weight": SECOND}))
    with pytest.raises(ValueError, match=f"{SECOND}: unexpected tensor 'model.layers.0.extra.weight'"):
        load(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    file = shard_of(ckpt, name)
    edit_shard(ckpt, file, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=rf"{file}: tensor '{name}' has shape \[16, 64\], expected \[32, 64\]"):
        load(ckpt)


def test_truncated_file(ckpt):
    data = (ckpt / FIRST).read_bytes()
    (ckpt / FIRST).write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{FIRST}: truncated safetensors file"):
        load(ckpt)


def test_duplicate_tensor_across_shards(ckpt):
    name = "model.norm.weight"
    other = SECOND if shard_of(ckpt, name) == FIRST else FIRST
    edit_shard(ckpt, other, lambda t: t.update({name: torch.ones(64)}))
    with pytest.raises(ValueError, match=f"tensor '{name}' appears in two shards"):
        load(ckpt)


def test_missing_shard_file(ckpt):
    (ckpt / SECOND).unlink()
    with pytest.raises(ValueError, match=f"shard file {SECOND} is missing"):
        load(ckpt)


def test_not_a_gguf_file(ckpt):
    with pytest.raises(ValueError, match=r"must be a \.gguf"):
        load(ckpt / "config.json")


def test_truncated_gguf(smollm2_path, tmp_path, monkeypatch):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(4 << 20))
    with pytest.raises(ValueError, match="cut.gguf: (malformed or )?truncated GGUF"):
        load(bad)


def test_kv_memory_budget(tiny_pangu):
    cfg = loader.load_config(tiny_pangu[0])
    per_block = 2 * 16 * 2 * 16 * 4 * 2  # K+V, block 16, 2 kv heads, head 16, fp32, 2 layers
    assert num_blocks_for_memory(10 * per_block + 5, cfg, 16, "float32") == 10
    assert num_blocks_for_memory(10 * per_block, cfg, 16, "bfloat16") == 20
    ex = ModelExecutor(tiny_pangu[0], device="cpu", kv_cache_bytes=3 * per_block, block_size=16)
    assert ex.num_blocks == 3
    with pytest.raises(ValueError, match="holds no block"):
        ModelExecutor(tiny_pangu[0], device="cpu", kv_cache_bytes=per_block - 1, block_size=16)


def test_hidden_size_not_divisible_by_heads_is_named(ckpt):
    edit_config(ckpt, hidden_size=66, head_dim=None)
    with pytest.raises(ValueError, match=r"hidden_size \(66\) is not a multiple of num_attention_heads \(4\)"):
        load(ckpt)
