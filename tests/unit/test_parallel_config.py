"""ParallelConfig's validation and the sharding rules (pure: no process, no model file)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.config import EngineConfig, ParallelConfig
from fnllm.model.model_config import DecoderConfig
from fnllm.model.parallel import kv_head_range, make_shard, pp_layer_range, source_slice

PANGU_7B = DecoderConfig(architecture="PanguEmbeddedForCausalLM", vocab_size=153376, hidden_size=4096,
                         intermediate_size=12800, num_layers=34, num_heads=32, num_kv_heads=8, head_dim=128,
                         rms_norm_eps=1e-5, rope_theta=1.6e7, max_position_embeddings=32768, attention_bias=True)


def test_defaults_and_backend_choice():
    assert EngineConfig().parallel == ParallelConfig()
    assert ParallelConfig().backend == "uni" and ParallelConfig().world_size == 1
    assert ParallelConfig(tensor_parallel_size=2).backend == "mp"
    assert ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3).world_size == 6
    assert ParallelConfig(distributed_executor_backend="ray").backend == "ray"


@pytest.mark.parametrize("kw,match", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(pipeline_parallel_size=-1), "pipeline_parallel_size must be a positive integer"),
    (dict(distributed_executor_backend="mpi"), "distributed_executor_backend must be one of"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "'uni' runs one process"),
])
def test_bad_parallel_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kw)


MODEL = dict(num_heads=32, num_kv_heads=8, num_layers=34, intermediate_size=12800)


@pytest.mark.parametrize("tp,pp,kw,match", [
    (3, 1, {}, "32 attention heads are not divisible by tensor_parallel_size 3"),
    (2, 1, dict(num_kv_heads=3, num_heads=6), "3 KV heads are not divisible by tensor_parallel_size 2"),
    (12, 1, dict(num_heads=48), "exceeds the model's 8 KV heads and is not a multiple"),
    (4, 1, dict(intermediate_size=102), "intermediate size 102 is not divisible"),
    (1, 35, {}, "pipeline_parallel_size 35 exceeds the model's 34 layers"),
])
def test_model_does_not_split(tp, pp, kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp).verify_with_model(**{**MODEL, **kw})


def test_model_splits_with_kv_replication():
    ParallelConfig(tensor_parallel_size=16, pipeline_parallel_size=34).verify_with_model(**MODEL)
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_head_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_layers_split_by_vllms_rule():
    assert [pp_layer_range(34, r, 4) for r in range(4)] == [(0, 8), (8, 17), (17, 26), (26, 34)]
    assert [pp_layer_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [pp_layer_range(4, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


@settings(max_examples=60)
@given(st.integers(1, 40), st.integers(1, 8), st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 4, 8]))
def test_shards_cover_the_model(layers, pp, tp, kvh):
    """Layers tile [0, L) in order; every query head's KV head lives on the rank that holds the query head."""
    pp = min(pp, layers)
    heads = 2 * max(tp, kvh)
    cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=16 * tp,
                        num_layers=layers, num_heads=heads, num_kv_heads=kvh, head_dim=8, rms_norm_eps=1e-5,
                        rope_theta=1e4, max_position_embeddings=64)
    ranges = [pp_layer_range(layers, s, pp) for s in range(pp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:] + [(layers, layers + 1)]))
    group = heads // kvh
    vocab_rows = 0
    for r in range(tp):
        s = make_shard(cfg, r, tp)
        for q in range(s.head_start, s.head_start + s.num_heads):
            assert s.kv_head_start <= q // group < s.kv_head_start + s.num_kv_heads
        part = source_slice(cfg, s, "model.embed_tokens.weight")
        vocab_rows += part.hi - part.lo
    assert vocab_rows == cfg.vocab_size


def test_pangu_7b_over_8_ranks_and_4_stages():
    s = make_shard(PANGU_7B, 3, 8, 2, 4)
    assert (s.num_heads, s.num_kv_heads, s.inter_size, s.vocab_shard) == (4, 1, 1600, 19172)
    assert (s.layer_start, s.layer_end, s.is_first, s.is_last) == (17, 26, False, False)
    assert source_slice(PANGU_7B, s, "model.layers.20.self_attn.q_proj.weight") .__dict__ == dict(dim=0, lo=1536, hi=2048)
    assert source_slice(PANGU_7B, s, "model.layers.20.self_attn.k_proj.bias").__dict__ == dict(dim=0, lo=384, hi=512)
    assert source_slice(PANGU_7B, s, "model.layers.20.self_attn.o_proj.weight").__dict__ == dict(dim=1, lo=1536, hi=2048)
    assert source_slice(PANGU_7B, s, "model.layers.20.mlp.down_proj.weight").__dict__ == dict(dim=1, lo=4800, hi=6400)
    assert source_slice(PANGU_7B, s, "model.layers.20.self_attn.o_proj.bias").dim is None
    assert source_slice(PANGU_7B, s, "model.layers.3.mlp.up_proj.weight") is None  # another stage's layer
    assert source_slice(PANGU_7B, s, "model.embed_tokens.weight") is None
    assert source_slice(PANGU_7B, s, "lm_head.weight") is None
    last = make_shard(PANGU_7B, 7, 8, 3, 4)
    assert source_slice(PANGU_7B, last, "lm_head.weight").__dict__ == dict(dim=0, lo=7 * 19172, hi=153376)
