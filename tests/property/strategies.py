"""Hypothesis strategies for configs, prompts and requests.

Prompts are drawn from a few shared stems so that prefix-cache hits happen;
pools are tiny so that eviction and preemption happen within a few steps.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.state import SamplingParams

VOCAB = 97
EOS = 0
STEMS = ((5, 6, 7, 8, 9, 10, 11, 12, 13), (20, 21, 22), (30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41))


@st.composite
def prompts(draw, max_len: int = 40) -> tuple[int, ...]:
    stem = draw(st.sampled_from(((),) + STEMS))
    tail = draw(st.lists(st.integers(1, VOCAB - 1), max_size=max(0, max_len - len(stem) - 1)))
    p = (stem + tuple(tail))[:max_len]
    return p or (1,)


@st.composite
def sampling_params(draw, max_tokens: int = 8, allow_n: bool = True) -> SamplingParams:
    greedy = draw(st.booleans())
    return SamplingParams(
        n=draw(st.integers(1, 3)) if allow_n else 1,
        temperature=0.0 if greedy else 1.0,
        seed=draw(st.integers(0, 2**16)),
        max_tokens=draw(st.integers(1, max_tokens)),
        min_tokens=draw(st.integers(0, 1)),
        ignore_eos=draw(st.booleans()),
        stop_token_ids=draw(st.lists(st.integers(1, VOCAB - 1), max_size=1)),
    )


@st.composite
def engine_configs(
    draw, max_blocks: int = 24, swap: bool | None = None, tight: bool = False, window: bool = True
) -> EngineConfig:
    """Tiny pools; ``swap`` True/False forces the preemption mode (None draws it),
    with a host tier of 0 to 16 blocks (0 or a few: swap falls back to recompute).
    ``tight``: a device pool just big enough for one request, so preemption is common.
    ``window``: draws a sliding window (None half the time), small enough that
    tables get holes."""
    bs = draw(st.sampled_from((1, 2, 4, 8)))
    mode = draw(st.sampled_from(("recompute", "swap"))) if swap is None else ("swap" if swap else "recompute")
    chunking = draw(st.booleans())
    max_len = 64
    budget = draw(st.integers(max_len if not chunking else 1, 96))
    return EngineConfig(
        model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(EOS,)),
        cache=CacheConfig(
            block_size=bs,
            num_blocks=draw(st.integers(max(1, 48 // bs), 48 // bs + (2 if tight else max(max_blocks - 48 // bs, 8)))),
            enable_prefix_caching=draw(st.booleans()),
            num_host_blocks=draw(st.sampled_from((0, 2, 6, 16))),
            sliding_window=draw(st.sampled_from((None, None, None, 1, 3, 6, 13))) if window else None,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=draw(st.integers(1, min(6, budget))),
            max_model_len=max_len,
            policy=draw(st.sampled_from(("fcfs", "priority"))),
            enable_chunked_prefill=chunking,
            long_prefill_token_threshold=draw(st.sampled_from((0, 0, 3, 7))),
            preemption_mode=mode,
        ),
    )
