"""fnllm.replace: the fast evolve gives what attrs.evolve gives, and refuses
classes whose __init__ does more than set fields."""

from __future__ import annotations

import attrs
import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.lifecycle import initial_state
from fnllm.replace import replace, replacer
from fnllm.state import EngineState, Request, Running, SamplingParams


def test_replace_equals_evolve_and_shares_the_rest():
    state = initial_state(EngineConfig(model=ModelConfig(vocab_size=50), cache=CacheConfig(block_size=4, num_blocks=8),
                                       scheduler=SchedulerConfig()))
    new = replace(state, step=7, num_preemptions=2)
    assert new == attrs.evolve(state, step=7, num_preemptions=2) and new is not state
    assert (new.step, state.step) == (7, 0) and new.pool is state.pool and new.requests is state.requests
    run = Running(seq_ids=(1,), num_computed=(3,))
    assert replacer(Running)(run, num_computed=(4,)) == Running(seq_ids=(1,), num_computed=(4,))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        new.step = 1


def test_replace_rejects_unknown_fields_and_classes_with_converters_or_checks():
    run = Running()
    with pytest.raises(TypeError):
        replace(run, no_such_field=1)
    with pytest.raises(TypeError, match="Request"):
        replace(Request(request_id="a", prompt_token_ids=[1]), arrival=3)  # a converter
    with pytest.raises(TypeError, match="SamplingParams"):
        replace(SamplingParams(), max_tokens=3)  # validation in __attrs_post_init__
    with pytest.raises(TypeError):
        replacer(dict)
    assert replacer(EngineState) is replacer(EngineState)


def test_replacer_of_named_fields_copies_the_converted_rest():
    req = Request(request_id="a", prompt_token_ids=[1, 2], priority=3)
    admit = replacer(Request, ("arrival", "block_hashes"))
    new = admit(req, arrival=5, block_hashes=(b"h",))
    assert new == attrs.evolve(req, arrival=5, block_hashes=(b"h",))
    assert new.prompt_token_ids is req.prompt_token_ids and new.sampling is req.sampling
    assert admit(req) == req and replacer(Request, ("arrival", "block_hashes")) is admit
    with pytest.raises(TypeError):
        admit(req, priority=1)  # not one of the named fields
    with pytest.raises(TypeError, match="Request"):
        replacer(Request, ("prompt_token_ids",))  # a converter
    with pytest.raises(TypeError, match="Request"):
        replacer(Request, ("no_such_field",))
    with pytest.raises(TypeError, match="SamplingParams"):
        replacer(SamplingParams, ("seed",))  # __attrs_post_init__ validates
