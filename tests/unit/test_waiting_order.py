"""The waiting queue stays in admission order (FCFS, or priority then
arrival) as requests arrive, and check_invariants names a queue out of order."""

from __future__ import annotations

import attrs
import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.invariants import check_invariants
from fnllm.lifecycle import add_request, initial_state
from fnllm.state import InvariantError, Request


def _config(policy: str) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(vocab_size=50),
        cache=CacheConfig(block_size=4, num_blocks=32),
        scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=32, policy=policy),
    )


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_arrivals_queue_in_admission_order(policy):
    config, state = _config(policy), None
    state = initial_state(config)
    for k, prio in enumerate((2, 0, 1, 0)):
        state = add_request(state, Request(request_id=f"r{k}", prompt_token_ids=[1, 2, 3], priority=prio), config)
        check_invariants(state, config)
    order = [s.request_id for s in state.waiting]
    assert order == (["r0", "r1", "r2", "r3"] if policy == "fcfs" else ["r1", "r3", "r2", "r0"])


def test_a_queue_out_of_order_is_named():
    config = _config("fcfs")
    state = initial_state(config)
    for k in range(2):
        state = add_request(state, Request(request_id=f"r{k}", prompt_token_ids=[1, 2]), config)
    swapped = attrs.evolve(state, waiting=state.waiting[::-1])
    with pytest.raises(InvariantError, match="invariant 10"):
        check_invariants(swapped, config)
