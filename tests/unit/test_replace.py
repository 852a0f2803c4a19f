"""fnllm.replace: the fast evolve gives what attrs.evolve gives, and refuses
classes whose __init__ does more than set fields; slot_init constructs what
attrs' own __init__ constructs."""

from __future__ import annotations

import attrs
import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.lifecycle import initial_state
from fnllm.replace import replace, replacer, slot_init
from fnllm.state import BatchPlan, EngineState, Outputs, Request, Running, SamplingParams, Seq, StepOutput


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


def _twins(kw_only: bool):
    """The same attrs class twice: attrs' own __init__, and slot_init's."""
    def make():
        @attrs.frozen(kw_only=kw_only)
        class Value:
            a: int
            b: tuple = ()
            c: str | None = None
        return Value
    return make(), slot_init(make())


@pytest.mark.parametrize("kw_only", [False, True])
def test_slot_init_constructs_what_attrs_init_does(kw_only):
    plain, fast = _twins(kw_only)
    for args, kwargs in ([(), {"a": 1}], [(), {"a": 1, "c": "x"}], [(), {"a": 2, "b": (3,), "c": None}]):
        assert attrs.asdict(fast(*args, **kwargs)) == attrs.asdict(plain(*args, **kwargs))
    if not kw_only:
        assert attrs.asdict(fast(1, (2,), "z")) == attrs.asdict(plain(1, (2,), "z"))
    for args, kwargs in ([(), {}], [(), {"a": 1, "d": 2}], [(1, 2, 3, 4), {}]):  # missing, unknown, too many
        for cls in (plain, fast):
            with pytest.raises(TypeError):
                cls(*args, **kwargs)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast(a=1).a = 2
    assert fast(a=1) == fast(a=1) and hash(fast(a=1)) == hash(fast(a=1))


def test_slot_init_keeps_the_signature_of_the_core_values():
    import inspect

    for cls in (Running, BatchPlan, StepOutput, Outputs, Seq):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        fields = attrs.fields(cls)
        assert [p.name for p in params] == [f.name for f in fields]
        assert [p.default for p in params] == [inspect.Parameter.empty if f.default is attrs.NOTHING else f.default
                                               for f in fields]
        assert {p.kind == inspect.Parameter.KEYWORD_ONLY for p in params} == {f.kw_only for f in fields}


def test_slot_init_refuses_factories_converters_and_post_init():
    @attrs.frozen
    class WithFactory:
        a: list = attrs.field(factory=list)

    @attrs.frozen
    class WithConverter:
        a: tuple = attrs.field(converter=tuple)

    @attrs.frozen
    class WithPostInit:
        a: int = 0

        def __attrs_post_init__(self) -> None:
            pass

    for cls in (WithFactory, WithConverter, WithPostInit):
        with pytest.raises(TypeError):
            slot_init(cls)
