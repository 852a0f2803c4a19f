"""Helpers for the integration tests: tiny random checkpoints in Hugging Face
layout (with their transformers reference model) and hand-built plans."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from fnllm.state import BatchPlan, SamplingParams

GREEDY = SamplingParams(temperature=0.0)

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)
PANGU = dict(TINY, rope_theta=1.6e7, bias=True, tie_word_embeddings=False, architectures=["PanguEmbeddedForCausalLM"])
LLAMA = dict(TINY, rope_theta=10000.0, attention_bias=False, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])


def mistral_config(window: int) -> dict:
    """A tiny Mistral: Llama without bias, untied, attending to the last ``window`` positions."""
    return dict(TINY, rope_theta=10000.0, sliding_window=window, tie_word_embeddings=False,
                architectures=["MistralForCausalLM"])


def reference_model(cfg: dict, seed: int = 0) -> LlamaForCausalLM:
    """transformers' Llama with the config's shape and O(1)-scale random weights
    (norm gains and biases randomised too, so loading them is tested)."""
    if cfg["architectures"][0] == "MistralForCausalLM":  # eager attention: the window applied as a mask
        hf_cfg = MistralConfig(**{k: v for k, v in cfg.items() if k != "architectures"}, attn_implementation="eager")
        cls = MistralForCausalLM
    else:
        hf_cfg = LlamaConfig(
            **{k: v for k, v in cfg.items() if k not in ("architectures", "bias", "attention_bias")},
            attention_bias=bool(cfg.get("bias", cfg.get("attention_bias", False))),
        )
        cls = LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def write_checkpoint(root: Path, cfg: dict, model: LlamaForCausalLM, shards: int = 2) -> Path:
    """config.json + ``shards`` safetensors files + model.safetensors.index.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::shards]}
        save_file(part, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return root


@torch.no_grad()
def reference_logits(model: LlamaForCausalLM, tokens) -> torch.Tensor:
    """Logits ``[len(tokens), vocab]`` of one sequence, float32."""
    return model(torch.tensor([list(tokens)])).logits[0].float()


def tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    """``n`` pseudo-random token ids (no special ids 0-2)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


@dataclass
class Seq:
    tokens: list[int]
    table: list[int] = field(default_factory=list)
    computed: int = 0


class Driver:
    """Hands out shuffled block ids and builds plan rows for test sequences."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: Seq, upto: int) -> None:
        while len(seq.table) * self.block_size < upto:
            seq.table.append(self.free.pop())

    def row(self, seq: Seq, n: int, *, num_samples=1, params=GREEDY, sample_index=0, output_pos=0):
        """The next ``n`` uncomputed tokens of ``seq`` as a plan row."""
        start = seq.computed
        self.grow(seq, start + n)
        seq.computed += n
        return dict(token_ids=tuple(seq.tokens[start : start + n]), positions=start, block_tables=tuple(seq.table),
                    num_samples=num_samples, sample_index=sample_index, output_pos=output_pos, sampling=params)


def make_plan(rows: list[dict], copies=(), step: int = 0) -> BatchPlan:
    cols = {k: tuple(r[k] for r in rows) for k in
            ("token_ids", "positions", "block_tables", "num_samples", "sample_index", "output_pos", "sampling")}
    return BatchPlan(step=step, seq_ids=tuple(range(len(rows))), request_ids=tuple(f"r{i}" for i in range(len(rows))),
                     copies=tuple(copies), **cols)
