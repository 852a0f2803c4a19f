"""State machine over the block pool alone: allocate, append, fork, free,
prefix hit and eviction under a tiny pool, the host tier (swap out,
swap in, offload of evicted cached blocks, host prefix hits) and sliding
windows (leading blocks released as holes, then forked, swapped, freed),
checking invariants 1, 2, 4-6, 17, 18, 20 and purity after every rule. The machine keeps
the KV content of every block of both tiers and applies each returned move,
so a wrong or missing move shows as a block holding other tokens."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from fnllm import blocks
from fnllm.blocks import chain_hashes, first_window_block
from fnllm.invariants import check_pool
from fnllm.state import HOLE, InvariantError
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

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from((1, 2, 4)), host_blocks=st.sampled_from((0, 3, 8)))
    def setup(self, num_blocks, block_size, host_blocks):
        self.bs = block_size
        self.pool = blocks.new_pool(num_blocks, block_size, host_blocks)
        self.seqs: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, table)
        self.swapped: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, host table)
        self.dev: dict[int, list] = {}  # emulated KV: block -> token per slot
        self.host: dict[int, list] = {}
        self.cached: list[list[int]] = []  # token lists whose full blocks were cached
        self.next = 0

    def _tables(self):
        return [tuple(t) for _, t in self.seqs.values()]

    def _write(self, tokens, table, start=0):
        for p in range(start, len(tokens)):
            assert table[p // self.bs] != HOLE, "a write into a hole"
            self.dev.setdefault(table[p // self.bs], [None] * self.bs)[p % self.bs] = tokens[p]

    def _move_out(self, moves):
        for d, h in moves:
            self.host[h] = list(self.dev[d])

    def _move_in(self, moves):
        for h, d in moves:
            self.dev[d] = list(self.host[h])

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def allocate(self, tokens):
        need = -(-len(tokens) // self.bs)
        got = pure(blocks.allocate, self.pool, need)
        if got is None:
            assert need > self.pool.num_free, "allocation failed although blocks were free"
            return
        self.pool, table = got
        self.seqs[self.next] = (list(tokens), list(table))
        self._write(tokens, table)
        self.next += 1

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def allocate_offloading(self, tokens):
        """An allocation that evicts cached blocks copies them to the host tier first."""
        need = -(-len(tokens) // self.bs)
        before = self.pool
        got = pure(blocks.allocate_offloading, self.pool, need)
        if got is None:
            assert need > self.pool.num_free
            return
        self.pool, table, moves = got
        for d, h in moves:
            assert d in before.hash_of and self.pool.host.hash_of[h] == before.hash_of[d], "offload lost a hash"
        self._move_out(moves)
        self.seqs[self.next] = (list(tokens), list(table))
        self._write(tokens, table)
        self.next += 1

    @rule()
    def flush_to_host(self):
        """Allocate every free block at once (evicting every cached one to the host tier), then free them."""
        n = self.pool.num_free
        if not n:
            return
        before = self.pool
        self.pool, table, moves = pure(blocks.allocate_offloading, self.pool, n)
        assert len(moves) == min(before.num_lru, before.host.num_free), "offload skipped a block with host room"
        self._move_out(moves)
        self.pool = pure(blocks.free, self.pool, table)

    @rule(k=st.integers(0, 100))
    def swap_out(self, k):
        if not self.seqs:
            return
        sid = sorted(self.seqs)[k % len(self.seqs)]
        tokens, table = self.seqs[sid]
        got = pure(blocks.swap_out, self.pool, tuple(table))
        if got is None:
            assert len(table) - table.count(HOLE) > self.pool.host.num_free, "swap out refused although host blocks were free"
            return
        self.pool, host_table, moves = got
        assert [d for d, _ in moves] == [b for b in table if b != HOLE]
        assert [h for _, h in moves] == [h for h in host_table if h != HOLE]
        assert [b == HOLE for b in table] == [h == HOLE for h in host_table], "holes stay holes in the host table"
        self._move_out(moves)
        del self.seqs[sid]
        self.swapped[sid] = (tokens, list(host_table))

    @rule(k=st.integers(0, 100))
    def swap_in(self, k):
        if not self.swapped:
            return
        sid = sorted(self.swapped)[k % len(self.swapped)]
        tokens, host_table = self.swapped[sid]
        got = pure(blocks.swap_in, self.pool, tuple(host_table))
        if got is None:
            assert len(host_table) - host_table.count(HOLE) > self.pool.num_free
            return
        self.pool, table, moves = got
        self._move_in(moves)
        for h in host_table:
            self.host.pop(h, None)  # a swapped-in host block is free: its content is gone
        del self.swapped[sid]
        self.seqs[sid] = (tokens, list(table))

    @rule(k=st.integers(0, 100))
    def host_prefix_hit(self, k):
        """A prefix cached earlier: its device part is shared, the part since
        offloaded to the host tier comes back into new device blocks."""
        host = self.pool.host.by_hash
        found = [t for t in self.cached if any(h in host for h in chain_hashes(t, self.bs))]
        if not found:
            return
        tokens = found[k % len(found)]
        hashes = chain_hashes(tokens, self.bs)
        dev = blocks.lookup_prefix(self.pool, hashes)
        got = pure(blocks.acquire_from_host, pure(blocks.acquire, self.pool, dev), hashes[len(dev) :])
        if got is None:
            return
        self.pool = blocks.acquire(self.pool, dev)
        self.pool, table, offloads, moves = got
        self._move_out(offloads)  # evicted cached blocks go to the host first, as a plan's swap_out
        self._move_in(moves)
        for h, _ in moves:
            self.host.pop(h, None)
        for b, h in zip(table, hashes[len(dev) :]):
            assert self.pool.hash_of[b] == h and h not in self.pool.host.by_hash
        n = len(dev) + len(table)
        self.seqs[self.next] = (list(tokens[: n * self.bs]), list(dev) + list(table))
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
            self.pool, new_table, copies = got
            for src, dst in copies:
                self.dev[dst] = list(self.dev[src])
            table[:] = new_table
            assert self.pool.ref[table[-1]] == 1, "invariant 4: written block is shared"
        else:
            got = pure(blocks.allocate, self.pool, 1)
            if got is None:
                return
            self.pool, (b,) = got
            table.append(b)
        tokens.append(tok)
        self._write(tokens, table, pos)

    @rule(k=st.integers(0, 100), window=st.integers(1, 9))
    def slide(self, k, window):
        """A sliding window of ``window`` positions: the blocks wholly before
        the window of the sequence's next position are released as holes."""
        if not self.seqs:
            return
        tokens, table = self.seqs[sorted(self.seqs)[k % len(self.seqs)]]
        before = self.pool
        self.pool, new = pure(blocks.release_outside_window, self.pool, tuple(table), len(tokens), window)
        h = first_window_block(len(tokens), window, self.bs)
        assert new[h:] == tuple(table[h:]) and all(b == HOLE for b in new[:h]), "holes are the leading blocks only"
        for b in set(table[:h]) - {HOLE}:
            assert self.pool.ref.get(b, 0) == before.ref[b] - table[:h].count(b), f"block {b} not released"
            if b in before.hash_of and b not in self.pool.ref:
                assert self.pool.hash_of.get(b) == before.hash_of[b], "a released cached block stays addressable"
        table[:] = new

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
    def drop_swapped(self, k):
        """A swapped sequence aborted: its host blocks are freed."""
        if not self.swapped:
            return
        tokens, host_table = self.swapped.pop(sorted(self.swapped)[k % len(self.swapped)])
        self.pool = attrs.evolve(self.pool, host=pure(blocks.free, self.pool.host, tuple(host_table)))

    @rule(k=st.integers(0, 100))
    def finish(self, k):
        """A sequence ends the way commit ends one: full blocks cached, then its table freed."""
        if self.seqs:
            self.cache_full_blocks(k)
            self.free(k)

    @rule(k=st.integers(0, 100))
    def cache_full_blocks(self, k):
        if not self.seqs:
            return
        tokens, table = self.seqs[sorted(self.seqs)[k % len(self.seqs)]]
        hashes = chain_hashes(tokens, self.bs)
        items = [  # (a hole was cached, if ever, before it was released: commit caches blocks as they fill)
            (table[j], h, (hashes[j - 1] if j else None, tuple(tokens[j * self.bs : (j + 1) * self.bs]), ()))
            for j, h in enumerate(hashes) if table[j] != HOLE
        ]
        self.pool = pure(blocks.cache_blocks, self.pool, items)
        self.cached.append(list(tokens))

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
        check_pool(self.pool.host, [tuple(t) for _, t in self.swapped.values()])
        assert not set(self.pool.by_hash.keys()) & set(self.pool.host.by_hash.keys()), "invariant 17: a hash in two tiers"
        if not self.seqs:
            assert self.pool.num_free == self.pool.num_blocks, "invariant 6: all free when nothing is held"
        if not self.swapped:
            assert self.pool.host.num_free == self.pool.host.num_blocks, "invariant 6: host blocks held"

    @invariant()
    def every_block_holds_its_tokens(self):
        """Every sequence's blocks, in either tier, and every cached block hold the right tokens."""
        for kv, seqs in ((self.dev, self.seqs), (self.host, self.swapped)):
            for tokens, table in seqs.values():
                for p, t in enumerate(tokens):
                    if table[p // self.bs] != HOLE:
                        assert kv[table[p // self.bs]][p % self.bs] == t, f"block {table[p // self.bs]} lost its content"
        for kv, pool in ((self.dev, self.pool), (self.host, self.pool.host)):
            for b, (_, toks, _) in pool.content.items():
                assert tuple(kv[b]) == tuple(toks), f"cached block {b} holds other tokens"

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
