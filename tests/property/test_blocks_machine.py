"""State machine over the block pool alone: allocate, append, fork, free,
prefix hit and eviction under a tiny pool, checking invariants 1, 2, 4-6
and purity after every rule."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from fnllm import blocks
from fnllm.blocks import chain_hashes
from fnllm.invariants import check_pool
from fnllm.state import InvariantError
from tests.property.invariants import snapshot_pool


def pure(fn, pool, *args):
    """Call ``fn(pool, *args)`` twice; check the input is untouched and the results equal."""
    before = snapshot_pool(pool)
    a = fn(pool, *args)
    assert snapshot_pool(pool) == before, f"{fn.__name__} mutated its input pool"
    b = fn(pool, *args)
    snap = lambda r: None if r is None else (snapshot_pool(r[0]), r[1:]) if isinstance(r, tuple) else snapshot_pool(r)
    assert snap(a) == snap(b), f"{fn.__name__} is not deterministic"
    return a


class PoolMachine(RuleBasedStateMachine):
    """Model: sequences with their tokens and block tables."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from((1, 2, 4)))
    def setup(self, num_blocks, block_size):
        self.bs = block_size
        self.pool = blocks.new_pool(num_blocks, block_size)
        self.seqs: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, table)
        self.next = 0

    def _tables(self):
        return [tuple(t) for _, t in self.seqs.values()]

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def allocate(self, tokens):
        need = -(-len(tokens) // self.bs)
        got = pure(blocks.allocate, self.pool, need)
        if got is None:
            assert need > self.pool.num_free, "allocation failed although blocks were free"
            return
        self.pool, table = got
        self.seqs[self.next] = (list(tokens), list(table))
        self.next += 1

    @rule(k=st.integers(0, 100), tok=st.integers(0, 3))
    def append(self, k, tok):
        if not self.seqs:
            return
        sid = sorted(self.seqs)[k % len(self.seqs)]
        tokens, table = self.seqs[sid]
        pos = len(tokens)
        if pos % self.bs:  # writes into its partial last block: copy-on-write first
            got = pure(blocks.make_writable, self.pool, tuple(table), pos // self.bs)
            if got is None:
                return
            self.pool, new_table, _ = got
            table[:] = new_table
            assert self.pool.ref[table[-1]] == 1, "invariant 4: written block is shared"
        else:
            got = pure(blocks.allocate, self.pool, 1)
            if got is None:
                return
            self.pool, (b,) = got
            table.append(b)
        tokens.append(tok)

    @rule(k=st.integers(0, 100))
    def fork(self, k):
        if not self.seqs:
            return
        tokens, table = self.seqs[sorted(self.seqs)[k % len(self.seqs)]]
        self.pool = pure(blocks.fork, self.pool, tuple(table))
        self.seqs[self.next] = (list(tokens), list(table))
        self.next += 1

    @rule(k=st.integers(0, 100))
    def free(self, k):
        if not self.seqs:
            return
        tokens, table = self.seqs.pop(sorted(self.seqs)[k % len(self.seqs)])
        self.pool = pure(blocks.free, self.pool, tuple(table))

    @rule(k=st.integers(0, 100))
    def cache_full_blocks(self, k):
        if not self.seqs:
            return
        tokens, table = self.seqs[sorted(self.seqs)[k % len(self.seqs)]]
        hashes = chain_hashes(tokens, self.bs)
        items = [
            (table[j], h, (hashes[j - 1] if j else None, tuple(tokens[j * self.bs : (j + 1) * self.bs]), ()))
            for j, h in enumerate(hashes)
        ]
        self.pool = pure(blocks.cache_blocks, self.pool, items)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def prefix_hit(self, tokens):
        hashes = chain_hashes(tokens, self.bs)
        hit = blocks.lookup_prefix(self.pool, hashes)
        for b, h in zip(hit, hashes):
            assert self.pool.hash_of[b] == h
        if not hit:
            return
        self.pool = pure(blocks.acquire, self.pool, hit)
        self.seqs[self.next] = (list(tokens[: len(hit) * self.bs]), list(hit))
        self.next += 1

    @invariant()
    def pool_invariants(self):
        check_pool(self.pool, self._tables())
        if not self.seqs:
            assert self.pool.num_free == self.pool.num_blocks, "invariant 6: all free when nothing is held"

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        for tokens, table in self.seqs.values():
            for j, b in enumerate(table[: len(tokens) // self.bs]):
                content = self.pool.content.get(b)
                if content is not None:
                    assert list(content[1]) == tokens[j * self.bs : (j + 1) * self.bs], "invariant 5"


TestPool = PoolMachine.TestCase


def test_machine_catches_a_broken_reference_count(monkeypatch):
    """A fork that forgets one reference must be caught by the invariants."""
    real = blocks.PoolEdit.incref

    def forgetful(self, b):
        if self.ref.get(b, 0) >= 1:
            return  # the bug: a second holder is not counted
        real(self, b)

    monkeypatch.setattr(blocks.PoolEdit, "incref", forgetful)
    with pytest.raises(BaseException) as info:
        run_state_machine_as_test(PoolMachine, settings=settings(settings.default, print_blob=False, max_examples=200))
    text = repr(info.value) + "".join(repr(e) for e in getattr(info.value, "exceptions", ()))
    assert "invariant" in text or isinstance(info.value, InvariantError)
