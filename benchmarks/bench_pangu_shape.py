"""Decode cost of a Pangu-7B-shaped model through the real engine, extrapolated to 34 layers.

openPangu-Embedded-7B's shapes (hidden 4096, 32 query / 8 KV heads of 128,
intermediate 12800, vocab 153376, bias on q/k/v/o, rope_theta 1.6e7, untied
embeddings) with random bf16 weights, written as a Hugging Face checkpoint
(``config.json`` with ``architectures: ["PanguEmbeddedForCausalLM"]`` and
``"bias": true``, safetensors shards, in a temporary directory) twice: with
``--layers-a`` and ``--layers-b`` decoder layers (default 1 and 3; the
embedding/lm_head shard and the layer shards are shared through symlinks).
Each runs end to end through ``ModelExecutor`` + ``LLMEngine`` (block size
128): ``B`` requests of ``--prompt-len`` random tokens are prefilled, then
``--steps`` decode steps are timed one by one (``LLMEngine.step``: schedule,
forward, sampling, commit); the median step counts.

Method: per layer = (step(b) - step(a)) / (b - a); the rest (embedding,
final norm, lm_head over 153376 tokens, sampling, engine) = step(a) - a *
per layer; 34-layer step = rest + 34 * per layer. The lm_head matmul is also
timed alone as a cross-check of the rest. Memory: about 2.5 GB of
embedding + lm_head plus 0.4 GB per layer.

    python benchmarks/bench_pangu_shape.py [--batches 1 16] [--layers-a 1 --layers-b 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["PanguEmbeddedForCausalLM"],
    "model_type": "PanguEmbedded",
    "hidden_size": 4096,
    "intermediate_size": 12800,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 153376,
    "rms_norm_eps": 1e-5,
    "rope_theta": 16000000.0,
    "max_position_embeddings": 32768,
    "bias": True,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 45892,
    "torch_dtype": "bfloat16",
}
FULL_LAYERS = 34


def _rand(*shape, gen) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_shards(root: Path, max_layers: int) -> None:
    """``embed.safetensors`` (embedding, final norm, lm_head) and one
    ``layer{N}.safetensors`` per layer."""
    from safetensors.torch import save_file

    c, gen = CONFIG, torch.Generator().manual_seed(0)
    h, i, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * 128, c["num_key_value_heads"] * 128
    save_file({"model.embed_tokens.weight": _rand(c["vocab_size"], h, gen=gen),
               "lm_head.weight": _rand(c["vocab_size"], h, gen=gen),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, str(root / "embed.safetensors"))
    for n in range(max_layers):
        p = f"model.layers.{n}."
        t = {
            p + "self_attn.q_proj.weight": _rand(q, h, gen=gen), p + "self_attn.q_proj.bias": _rand(q, gen=gen),
            p + "self_attn.k_proj.weight": _rand(kv, h, gen=gen), p + "self_attn.k_proj.bias": _rand(kv, gen=gen),
            p + "self_attn.v_proj.weight": _rand(kv, h, gen=gen), p + "self_attn.v_proj.bias": _rand(kv, gen=gen),
            p + "self_attn.o_proj.weight": _rand(h, q, gen=gen), p + "self_attn.o_proj.bias": _rand(h, gen=gen),
            p + "mlp.gate_proj.weight": _rand(i, h, gen=gen), p + "mlp.up_proj.weight": _rand(i, h, gen=gen),
            p + "mlp.down_proj.weight": _rand(h, i, gen=gen),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }
        save_file(t, str(root / f"layer{n}.safetensors"))


def checkpoint_dir(root: Path, layers: int) -> Path:
    """A checkpoint of ``layers`` layers made of links to the shared shards."""
    from safetensors import safe_open

    d = root / f"pangu-{layers}l"
    d.mkdir()
    files = ["embed.safetensors"] + [f"layer{n}.safetensors" for n in range(layers)]
    weight_map = {}
    for f in files:
        os.symlink(root / f, d / f)
        with safe_open(str(root / f), framework="pt") as st:
            weight_map.update({k: f for k in st.keys()})
    (d / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}, indent=1))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def engine_for(path: Path, num_blocks: int, block_size: int):
    from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from fnllm.device.executor import ModelExecutor
    from fnllm.engine import LLMEngine

    ex = ModelExecutor(path, dtype="bfloat16", device="cpu", num_blocks=num_blocks, block_size=block_size)
    config = EngineConfig(
        model=ModelConfig(model=str(path), dtype="bfloat16", device="cpu", vocab_size=ex.vocab_size,
                          eos_token_ids=ex.eos_token_ids),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64, max_model_len=4096),
    )
    return ex, LLMEngine(config, ex, None)


def decode_steps(engine, batch: int, prompt_len: int, steps: int, tag: str) -> dict:
    from fnllm.state import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
    for r in range(batch):
        engine.add_request(f"{tag}-{r}", [rng.randrange(100, 150000) for _ in range(prompt_len)], params)
    t0 = time.perf_counter()
    engine.step()  # every prompt in one step (batch * prompt_len <= the token budget)
    prefill = time.perf_counter() - t0
    engine.step()  # warm-up decode step
    times = []
    for _ in range(steps):
        plan_rows_before = engine.get_num_unfinished_requests()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        assert plan_rows_before == batch
    while engine.has_unfinished_requests():
        engine.step()
    return {"step_ms": round(statistics.median(times) * 1e3, 2), "step_ms_all": [round(t * 1e3, 1) for t in times],
            "prefill_ms": round(prefill * 1e3, 1)}


def time_lm_head(ex, batch: int, reps: int = 5) -> float:
    x = torch.randn(batch, ex.config.hidden_size).to(ex.dtype)
    with torch.inference_mode():
        ex.backend.linear(x, ex.model.lm_head)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            ex.backend.linear(x, ex.model.lm_head).float()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--layers-a", type=int, default=1)
    ap.add_argument("--layers-b", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args()
    la, lb = args.layers_a, args.layers_b
    result = {
        "benchmark": "Pangu-7B-shaped decode (random bf16 weights) through ModelExecutor + LLMEngine",
        "shape": {k: CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "bias")},
        "block_size": args.block_size, "prompt_len": args.prompt_len, "timed_steps": args.steps,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "method": (f"median LLMEngine.step time of pure decode steps with {la} and {lb} layers; per layer = "
                   f"(t{lb} - t{la}) / {lb - la}; rest (embedding, final norm, lm_head, sampling, engine) = "
                   f"t{la} - {la} * per layer; 34 layers = rest + 34 * per layer"),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="fnllm-pangu-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_shards(root, max(la, lb))
        result["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        per_blocks = -(-(args.prompt_len + args.steps + 4) // args.block_size)
        num_blocks = max(args.batches) * per_blocks + 4
        for layers in (la, lb):
            t0 = time.perf_counter()
            ex, engine = engine_for(checkpoint_dir(root, layers), num_blocks, args.block_size)
            run = {"load_s": round(time.perf_counter() - t0, 1)}
            for b in args.batches:
                run[f"batch_{b}"] = decode_steps(engine, b, args.prompt_len, args.steps, f"L{layers}b{b}")
                if layers == la:
                    run[f"batch_{b}"]["lm_head_alone_ms"] = round(time_lm_head(ex, b), 2)
            result["runs"][f"{layers}_layers"] = run
            del ex, engine
            gc.collect()
    for b in args.batches:
        ta = result["runs"][f"{la}_layers"][f"batch_{b}"]["step_ms"]
        tb = result["runs"][f"{lb}_layers"][f"batch_{b}"]["step_ms"]
        per_layer = (tb - ta) / (lb - la)
        rest = ta - la * per_layer
        full = rest + FULL_LAYERS * per_layer
        result[f"batch_{b}"] = {
            "ms_per_layer_per_step": round(per_layer, 2),
            "ms_rest_per_step": round(rest, 2),
            "ms_per_step_34_layers": round(full, 1),
            "tokens_per_s_34_layers": round(b * 1e3 / full, 2),
        }
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
