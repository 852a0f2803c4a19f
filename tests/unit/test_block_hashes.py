"""chain_hashes (the whole prompt packed once) names each block exactly as
hash_block does, block by block, for any block size, extra keys, known
parents and limit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fnllm.blocks import chain_hashes, hash_block


def _one_by_one(tokens, bs, extra, parents, limit):
    n_full = len(tokens) // bs if limit is None else min(limit, len(tokens) // bs)
    out = list(parents)
    for j in range(len(parents), n_full):
        out.append(hash_block(out[-1] if out else None, tokens[j * bs : (j + 1) * bs], extra))
    return tuple(out)


@given(
    tokens=st.lists(st.integers(0, 2**63 - 1), max_size=70).map(tuple),
    bs=st.sampled_from([1, 3, 16]),
    extra=st.sampled_from([(), ("lora", 2), (7,)]),
    known=st.integers(0, 4),
    limit=st.none() | st.integers(0, 8),
)
def test_chain_hashes_equal_hash_block_by_block(tokens, bs, extra, known, limit):
    parents = _one_by_one(tokens, bs, extra, (), None)[:known]
    assert chain_hashes(tokens, bs, extra, parents, limit) == _one_by_one(tokens, bs, extra, parents, limit)


def test_chain_hashes_of_a_short_prompt_is_the_parents():
    assert chain_hashes((1, 2, 3), 4) == ()
    assert chain_hashes((1, 2, 3, 4), 2, parents=(b"p" * 32,), limit=1) == (b"p" * 32,)
