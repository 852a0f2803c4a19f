"""Bad configs and bad sampling parameters raise ValueError naming the field."""

from __future__ import annotations

import math

import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.state import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -16}, "block_size"),
        ({"block_size": 12}, "block_size"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": -1}, "num_blocks"),
    ],
)
def test_cache_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"policy": "lifo"}, "policy"),
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold"),
        ({"enable_chunked_prefill": False, "max_num_batched_tokens": 100, "max_model_len": 200, "max_num_seqs": 8},
         "chunked prefill"),
        ({"max_num_batched_tokens": 16, "max_num_seqs": 32}, r"max_num_batched_tokens \(16\) must be >= max_num_seqs \(32\)"),
    ],
)
def test_scheduler_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_engine_config_budget_below_block_size_without_chunking():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(
            cache=CacheConfig(block_size=128),
            scheduler=SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=64,
                                      max_num_seqs=8),
        )


@pytest.mark.parametrize(
    "kwargs, field",
    [({"dtype": "int8"}, "dtype"), ({"device": "tpu"}, "device"), ({"vocab_size": 0}, "vocab_size"),
     ({"vocab_size": 10, "eos_token_ids": (10,)}, "eos_token_ids"), ({"max_logprobs": 0}, "max_logprobs")],
)
def test_model_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, r"seed must be < 2\*\*64"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_sampling_params_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_conversions():
    sp = SamplingParams(stop="END", stop_token_ids=[3, 4], top_k=0)
    assert sp.stop == ("END",) and sp.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
