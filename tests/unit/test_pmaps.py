"""fnllm.pmaps: every version reads as its own content, whatever was read or
edited since (a model of plain dict copies is the oracle)."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.blocks import PoolEdit, new_pool
from fnllm.pmaps import MISSING, Edit, View, from_maps, new_store

KEYS = st.integers(0, 7)
OPS = st.lists(
    st.tuples(st.sampled_from(["open", "put", "drop", "read", "finish", "abandon"]), st.integers(0, 50), KEYS, st.integers(0, 99)),
    max_size=60,
)


def _content(v) -> tuple[dict, ...]:
    return tuple(dict(View(v, i).items()) for i in range(2))


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_versions_keep_their_content(ops):
    versions = [new_store(2)]
    models: list[tuple[dict, ...]] = [({}, {})]
    edits: list[tuple[Edit, tuple[dict, ...]]] = []  # open edits and their model
    for op, pick, k, val in ops:
        i = val % 2
        if op == "open":
            j = pick % len(versions)
            edits.append((Edit(versions[j]), tuple(dict(m) for m in models[j])))
        elif op in ("put", "drop") and edits:
            e, model = edits[pick % len(edits)]
            e.own()
            if op == "put":
                e.put(i, k, val)
                model[i][k] = val
            elif k in model[i]:
                e.drop(i, k)
                del model[i][k]
        elif op == "read":
            j = pick % len(versions)
            assert View(versions[j], i).get(k, MISSING) == models[j][i].get(k, MISSING)
        elif op in ("finish", "abandon") and edits:
            e, model = edits.pop(pick % len(edits))
            if op == "finish":
                versions.append(e.version)
                models.append(model)
    for v, model in zip(versions, models):
        assert _content(v) == model
    for e, model in edits:  # still-open edits read as what they wrote
        e.own()
        assert tuple(dict(m) for m in e.maps) == model


def test_compare_and_pickle_by_content():
    a = from_maps(({1: 2}, {}))
    e = Edit(a)
    e.put(0, 3, 4)
    b = e.version
    assert a != b and a == from_maps(({1: 2}, {}))
    back = pickle.loads(pickle.dumps(b))
    assert back == b and View(back, 0)[3] == 4 and View(a, 0).get(3) is None
    with pytest.raises(TypeError):
        hash(a)


def test_a_dropped_edit_leaves_the_pool_as_it_was():
    pool = new_pool(8, 4)
    e = PoolEdit(pool)
    e.allocate(3)
    with pytest.raises(Exception):
        e.decref(7)  # not referenced: the caller's pure function fails midway
    assert dict(pool.ref.items()) == {} and pool.num_free == 8
    e2 = PoolEdit(pool)
    got = e2.allocate(2)
    after = e2.finish()
    assert dict(after.ref.items()) == {b: 1 for b in got} and dict(pool.ref.items()) == {}
