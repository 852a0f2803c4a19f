"""fnllm.derived: identity-keyed memos of facts about the core's values.

A hit must return what recomputing would; anything not the very object a
fact was noted for recomputes; and check_invariants catches a wrong note."""

from __future__ import annotations

import pytest

from fnllm import derived
from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.invariants import check_invariants
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import InvariantError, Request, SamplingParams
from fnllm.step import commit

CONFIG = EngineConfig(
    model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
    cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=True),
    scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64),
)


def _decoding_state(steps: int = 3):
    state = initial_state(CONFIG)
    for k, mt in enumerate((9, 12, 20)):
        sp = SamplingParams(temperature=0.0, max_tokens=mt, ignore_eos=True, stop_token_ids=(90 + k,))
        state = add_request(state, Request(request_id=f"r{k}", prompt_token_ids=range(1 + k, 7 + k), sampling=sp), CONFIG)
    ex = FakeExecutor(64, 4, vocab_size=97)
    for _ in range(steps):
        state, plan = schedule(state, CONFIG)
        state, _ = commit(state, plan, ex.execute(plan), CONFIG)
    return state


def test_traits_summarize_the_column_and_hit_only_the_same_tuple():
    sps = (SamplingParams(n=2, max_tokens=5, stop_token_ids=(7,)), SamplingParams(max_tokens=9, stop_token_ids=(8, 9)))
    t = derived.traits(sps)
    assert (t.max_n, t.guided, t.history, t.stop_ids, t.max_tokens) == (2, False, False, frozenset({7, 8, 9}), (5, 9))
    assert derived.traits(sps) is t  # the memo
    copy = tuple(list(sps))
    assert copy is not sps and derived.traits(copy) == t


def test_a_length_margin_is_used_only_for_the_objects_it_was_noted_for():
    sps = (SamplingParams(max_tokens=10), SamplingParams(max_tokens=4))
    nout = (1, 2)
    assert derived.length_margin(sps, nout) == 2  # computed
    derived.note_length_margin(sps, nout, 99)  # a (wrong) note is returned for exactly these objects...
    assert derived.length_margin(sps, nout) == 99
    assert derived.length_margin(sps, tuple(list(nout))) == 2  # ...and nothing else
    assert derived.length_margin(tuple(list(sps)), nout) == 2


def test_the_memos_stay_bounded():
    for k in range(100):
        derived.note_length_margin((), (k,), k)
        derived.traits(tuple([SamplingParams(max_tokens=k + 1)]))
    assert len(derived._MARGIN) <= derived._RECENT and len(derived._TRAITS) <= derived._SIZE


def test_a_decode_step_notes_what_the_next_step_reuses_and_it_is_true():
    state = _decoding_state()
    run = state.running
    assert len(run) == 3 and derived.decode_ready(run)
    assert all(t - c == 1 for t, c in zip(run.num_tokens, run.num_computed))
    want = min(sp.max_tokens - k for sp, k in zip(run.sampling, run.num_output))
    assert derived.length_margin(run.sampling, run.num_output) == want
    check_invariants(state, CONFIG)
    mid, plan = schedule(state, CONFIG)
    rows = [r for r, p in enumerate(plan.positions) if (p + 1) % 4 == 0]
    assert derived.known_crossing(plan, 4) == rows
    assert derived.known_crossing(plan, 8) is None  # noted for block size 4 only


def test_check_invariants_catches_a_wrong_note():
    state = _decoding_state()
    run = state.running
    derived.note_length_margin(run.sampling, run.num_output, 1000)
    with pytest.raises(InvariantError, match="length margin"):
        check_invariants(state, CONFIG)
    derived._MARGIN.clear()
    mid, _ = schedule(state, CONFIG)  # a Running mid-step has a row with 1 token computed ahead: not decode-ready
    derived.note_decode_ready(mid.running)
    with pytest.raises(InvariantError, match="decode-ready"):
        check_invariants(mid, CONFIG)


def test_traits_noted_after_rows_leave_or_join_equal_recomputing():
    plain = tuple(SamplingParams(max_tokens=m) for m in (5, 9, 7))
    old = derived.traits(plain)
    kept = (plain[0], plain[2])
    derived.note_traits_after(plain, kept, [True, False, True])
    assert derived.traits(kept) == derived.Traits.of(kept) and derived.traits(kept).max_tokens == (5, 7)
    joined = kept + (SamplingParams(max_tokens=3, n=2, stop_token_ids=(4,)),)
    derived.note_traits_after(plain, joined, [True, False, True, True])
    assert derived.traits(joined) == derived.Traits.of(joined) and derived.traits(joined).max_n == 2
    assert old == derived.Traits.of(plain)


def test_traits_are_not_derived_when_a_leaving_row_may_have_set_them():
    wide = (SamplingParams(max_tokens=4, n=3), SamplingParams(max_tokens=6))
    derived.traits(wide)
    rest = wide[1:]
    derived.note_traits_after(wide, rest, [False, True])
    assert id(rest) not in derived._TRAITS  # nothing noted: recomputed on demand
    assert derived.traits(rest).max_n == 1


def test_traits_of_a_column():
    from fnllm.state import GuidedDecodingParams

    plain = SamplingParams(max_tokens=3)
    column = (plain, SamplingParams(n=3, max_tokens=5, stop_token_ids=[7, 8]),
              SamplingParams(max_tokens=9, stop_token_ids=[8, 9], repetition_penalty=1.2),
              SamplingParams(max_tokens=2, guided_decoding=GuidedDecodingParams(choice=["a", "b"])))
    t = derived.Traits.of(column)
    assert t == (3, True, True, frozenset({7, 8, 9}), (3, 5, 9, 2))
    assert (t.max_n, t.guided, t.history, t.stop_ids, t.max_tokens) == tuple(t)
    assert derived.Traits.of((plain,)) == (1, False, False, frozenset(), (3,))
    assert derived.Traits.of(()) == (1, False, False, frozenset(), ())
