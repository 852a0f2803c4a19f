"""The KV block pool as pure functions over :class:`~fnllm.state.BlockPool`.

A block is either referenced (``ref[b] > 0``) or free. Free blocks that hold
no cached content sit in ``free_stack`` or in the never-used range
``[fresh, num_blocks)`` and are handed out first; free blocks that still hold
a cached full block stay addressable by hash in LRU order and are evicted
(their hash forgotten) only when nothing else is left. Full blocks are named
by a chained SHA-256 of (parent hash, token ids, extra keys).

:class:`PoolEdit` is a transient: a private, mutable working copy that a
pure function opens, edits and freezes with :meth:`PoolEdit.finish`, so a
step's many small changes cost O(changes) and never copy pool-sized
structures. The module-level functions are pure wrappers over it.

Tiers: ``pool.host`` is the host pool (same structure). A PoolEdit edits
both (``edit.host`` is the host's PoolEdit, opened on first use) and records
the moves a plan must carry: ``swaps_out`` (device, host) and ``swaps_in``
(host, device). Host blocks read by a swap_in, or written by a swap_out, are
pinned until ``finish`` (``host_release``), so no host block is reused by a
later move of the same plan. With ``offload`` on (the host prefix cache), a
cached device block evicted by ``take`` is copied to a host block and stays
addressable there by its hash.

Sliding window (``CacheConfig.sliding_window`` = W): a row whose next token
is at position ``p`` attends to positions ``> p - W`` only, so the blocks of
its table before :func:`first_window_block` ``(p)`` are never read again.
:meth:`PoolEdit.punch` drops its references on them and their entries become
:data:`~fnllm.state.HOLE`. The rules:

- Holes are a leading run of a table (the window only slides forward), at
  most ``first_window_block(num_computed)`` long, so no step reads one.
- A released block is an ordinary decref: a block still held by another
  table (a fork's sibling, a sequence sharing a cached prefix) stays, and a
  cached one stays addressable by its hash in the LRU (its content is
  intact), so prefix hits and the host/disk tiers work on it as on any
  cached block. Full blocks are hashed in commit as they fill, before any
  can become a hole, so hash chains never have gaps.
- A fork (n > 1) copies its parent's holes; each child releases its share of
  the blocks on its own. Copy-on-write only touches the tail block, which
  is inside the window.
- Swap-out moves only the blocks of the table (holes stay holes in the host
  table, taking no host block); swap-in allocates device blocks for those
  only. Recompute preemption frees the blocks; the sequence recomputes from
  position 0 (its KV does not depend on how it was chunked).
- Admission with a cached prefix takes references only on the hits inside
  the window of its first computed position; the rest become holes at once
  (host-tier hits there are not swapped in: they stay cached on the host).
- The disk tier saves a prompt block right after the step that filled it,
  before the next schedule can release it; disk hits are staged into the
  host tier and follow the host rule above.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

from fnllm.pmaps import MISSING, Edit
from fnllm.replace import replacer
from fnllm.state import BY_HASH, CONTENT, HASH_OF, HOLE, LRU_NEXT, LRU_PREV, REF, BlockPool, Cons, InvariantError

NO_BLOCK = -1
_replace_pool = replacer(BlockPool)
_ROOT = bytes(32)


_LENGTH = struct.Struct("<I")


def _words(n: int):
    """``struct`` packer of n tokens as little-endian i64 (memoised per n)."""
    pack = _WORDS.get(n)
    if pack is None:
        if len(_WORDS) >= 4096:
            _WORDS.clear()
        pack = _WORDS[n] = struct.Struct(f"<{n}q").pack
    return pack


_WORDS: dict = {}


def hash_block(parent: bytes | None, tokens: Sequence[int], extra: tuple = ()) -> bytes:
    """Chained, collision-resistant name of a full block's content:
    SHA-256 of (parent, length as u32, tokens as i64, repr(extra)), little-endian."""
    n = len(tokens)
    return _digest(parent or _ROOT, _LENGTH.pack(n), _words(n)(*tokens), _extra_bytes(extra))


def _digest(parent: bytes, length: bytes, words: bytes, extra: bytes) -> bytes:
    """The one place the block hash's bytes are laid out (see :func:`hash_block`)."""
    return hashlib.sha256(parent + length + words + extra).digest()


def _extra_bytes(extra: tuple) -> bytes:
    return repr(extra).encode() if extra else b""


def chain_hashes(
    tokens: Sequence[int], block_size: int, extra: tuple = (), parents: tuple[bytes, ...] = (), limit: int | None = None
) -> tuple[bytes, ...]:
    """Hashes of the full blocks of ``tokens``, extending the chain ``parents``
    (hashes of the first ``len(parents)`` blocks), up to ``limit`` blocks.
    Equal to :func:`hash_block` applied block by block; the tokens are
    packed once and each block's hash reads its slice of the packed bytes."""
    n_full = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    out = list(parents)
    first = len(parents)
    if n_full <= first:
        return tuple(out)
    words = _words((n_full - first) * block_size)(*tokens[first * block_size : n_full * block_size])
    length, tail, width = _LENGTH.pack(block_size), _extra_bytes(extra), 8 * block_size
    parent = out[-1] if out else _ROOT
    for at in range(0, len(words), width):
        parent = _digest(parent, length, words[at : at + width], tail)
        out.append(parent)
    return tuple(out)


def first_window_block(pos: int, window: int | None, block_size: int) -> int:
    """The first block a row whose first new token is at ``pos`` reads: every
    block before it lies wholly before position ``pos - window + 1``, outside
    the window of every query from ``pos`` on (0 without a window)."""
    if not window:
        return 0
    return max(0, pos - window + 1) // block_size


def new_pool(num_blocks: int, block_size: int, num_host_blocks: int = 0) -> BlockPool:
    host = BlockPool(num_blocks=num_host_blocks, block_size=block_size)
    return BlockPool(num_blocks=num_blocks, block_size=block_size, host=host)


class PoolEdit(Edit):
    """Mutable working copy of a pool, private to one pure function call.

    A new version of the pool's maps (:class:`~fnllm.pmaps.Edit`), written in
    place; ``ref``, ``nxt``, ``prv``, ``hash_of``, ``by_hash`` and ``content``
    are its dicts, read-only outside this class, and hold this edit's version
    while no other version of the same pool is read (every method first
    makes sure of it, with :meth:`own`)."""

    def __init__(self, pool: BlockPool, offload: bool = False) -> None:
        super().__init__(pool.maps)
        self.pool = pool
        self.offload = offload
        self._host: PoolEdit | None = None
        self.swaps_out: list[tuple[int, int]] = []
        self.swaps_in: list[tuple[int, int]] = []
        self.host_release: list[int] = []
        self._moved: dict[int, int] = {}  # device block -> host block it was swapped to, this edit
        self.ref, self.nxt, self.prv, self.hash_of, self.by_hash, self.content = self.maps
        self.stack: Cons = pool.free_stack
        self.num_stack = pool.num_stack
        self.fresh = pool.fresh
        self.head, self.tail, self.num_lru = pool.lru_head, pool.lru_tail, pool.num_lru

    @property
    def num_free(self) -> int:
        return self.num_stack + (self.pool.num_blocks - self.fresh) + self.num_lru

    # -- LRU list of cached free blocks ----------------------------------------
    def _lru_append(self, b: int) -> None:
        t = self.tail
        if t != NO_BLOCK:  # two puts, written out (hot)
            nxt, prv = self.nxt, self.prv
            self.log.extend((LRU_NEXT, t, nxt.get(t, MISSING), LRU_PREV, b, prv.get(b, MISSING)))
            nxt[t] = b
            prv[b] = t
        else:
            self.head = b
        self.tail = b
        self.num_lru += 1

    def _lru_remove(self, b: int) -> None:
        if b == self.head:
            self._lru_pop()
            return
        p, n = self.prv[b], self.nxt.get(b, NO_BLOCK)  # not the head: it has a predecessor
        self.drop(LRU_PREV, b)
        if n != NO_BLOCK:
            self.put(LRU_NEXT, p, n)
            self.drop(LRU_NEXT, b)
            self.put(LRU_PREV, n, p)
        else:
            self.drop(LRU_NEXT, p)
            self.tail = p
        self.num_lru -= 1

    def _lru_pop(self) -> int:
        """Unlink and return the LRU list's head (the list is not empty), its
        dict writes written out (hot: every eviction)."""
        b = self.head
        n = self.nxt.get(b, NO_BLOCK)
        if n != NO_BLOCK:
            nxt, prv = self.nxt, self.prv
            self.log.extend((LRU_NEXT, b, n, LRU_PREV, n, prv[n]))
            del nxt[b], prv[n]
        else:
            self.tail = NO_BLOCK
        self.head = n
        self.num_lru -= 1
        return b

    def _forget(self, b: int) -> None:
        h = self.hash_of.get(b)
        if h is not None:  # three drops, written out (hot); a KeyError changes nothing
            by_hash, content = self.by_hash, self.content
            self.log.extend((HASH_OF, b, h, BY_HASH, h, by_hash[h], CONTENT, b, content[b]))
            del self.hash_of[b], by_hash[h], content[b]

    # -- allocation ---------------------------------------------------------------
    def take(self) -> int:
        """One block (reference count 1); the caller checks ``num_free`` first."""
        if self.store.root is not self.version:
            self.own()
        if self.stack is not None:
            b, self.stack = self.stack
            self.num_stack -= 1
        elif self.fresh < self.pool.num_blocks:
            b = self.fresh
            self.fresh += 1
        else:
            b = self._lru_pop()
            if self.offload:
                self._offload(b)
            self._forget(b)
        ref = self.ref
        self.log.extend((REF, b, ref.get(b, MISSING)))  # put, written out (hot)
        ref[b] = 1
        return b

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks with reference count 1, or None (nothing changed)."""
        if n > self.num_free:
            return None
        return [self.take() for _ in range(n)]

    def incref(self, b: int) -> None:
        if self.store.root is not self.version:
            self.own()
        r = self.ref.get(b, 0)
        if r == 0:
            if b not in self.hash_of:
                raise InvariantError(f"incref of free uncached block {b}")
            self._lru_remove(b)
        self.put(REF, b, r + 1)

    def decref(self, b: int) -> None:
        if self.store.root is not self.version:
            self.own()
        r = self.ref.get(b, 0)
        if r <= 0:
            raise InvariantError(f"invariant 1: free of block {b} that is not referenced")
        if r > 1:
            self.put(REF, b, r - 1)
            return
        self.log.extend((REF, b, 1))  # drop, written out (hot: every freed block)
        del self.ref[b]
        if b in self.hash_of:
            self._lru_append(b)
        else:
            self.stack = (b, self.stack)
            self.num_stack += 1

    def free_table(self, table: Iterable[int]) -> None:
        """Release a sequence's blocks, last block first, so its tail is evicted first (holes skipped)."""
        for b in reversed(tuple(table)):
            if b != HOLE:
                self.decref(b)

    def punch(self, table: tuple[int, ...], pos: int, window: int | None) -> tuple[int, ...]:
        """``table`` with the blocks before :func:`first_window_block` ``(pos)``
        released and made holes (last first, like ``free_table``); ``table``
        itself when there is nothing new to release (an O(1) check)."""
        h = first_window_block(pos, window, self.pool.block_size)
        if not h or table[h - 1] == HOLE:
            return table
        j = h - 1
        while j >= 0 and table[j] != HOLE:
            self.decref(table[j])
            j -= 1
        return (HOLE,) * h + table[h:]

    # -- prefix cache -------------------------------------------------------------
    def lookup(self, hashes: Iterable[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of the hash chain ``hashes``."""
        self.own()
        out = []
        by_hash = self.by_hash
        for h in hashes:
            b = by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def uncache(self, b: int) -> None:
        """Forget block ``b``'s cached content (it can no longer be trusted); a
        free cached block becomes a plain free block. No-op when not cached."""
        self.own()
        if b not in self.hash_of:
            return
        self._forget(b)
        if self.ref.get(b, 0) == 0:
            self._lru_remove(b)
            self.stack = (b, self.stack)
            self.num_stack += 1

    def cache(self, b: int, h: bytes, content: tuple) -> bool:
        """Name full block ``b`` by ``h``; False when ``h`` or ``b`` is already named.
        A host-tier copy of ``h`` is dropped (a hash lives in one tier)."""
        if self.store.root is not self.version:
            self.own()
        if h in self.by_hash or b in self.hash_of:
            return False
        hp = self.pool.host
        if hp is not None and (self._host is not None or _has_cached(hp)):
            host = self.host
            hb = host.by_hash.get(h)
            if hb is not None:
                host.drop_cached(hb)
        # three puts, written out (hot); neither b nor h was named
        self.log.extend((HASH_OF, b, MISSING, BY_HASH, h, MISSING, CONTENT, b, self.content.get(b, MISSING)))
        self.hash_of[b] = h
        self.by_hash[h] = b
        self.content[b] = content
        return True

    def writable(self, table: list[int], j: int, copies: list[tuple[int, int]]) -> bool:
        """Make ``table[j]`` private (copy-on-write); False when no block is free."""
        self.own()
        b = table[j]
        if self.ref[b] == 1:
            return True
        dst = self.allocate(1)
        if dst is None:
            return False
        self.decref(b)
        table[j] = dst[0]
        copies.append((b, dst[0]))
        return True

    def drop_cached(self, b: int) -> None:
        """Forget cached block ``b``'s hash; a free one becomes plain free."""
        self.own()
        if self.ref.get(b, 0) == 0:
            self._lru_remove(b)
            self._forget(b)
            self.stack = (b, self.stack)
            self.num_stack += 1
        else:
            self._forget(b)

    # -- tiers ----------------------------------------------------------------------
    @property
    def host(self) -> "PoolEdit":
        if self._host is None:
            self._host = PoolEdit(self.pool.host)
        return self._host

    def host_free(self) -> int:
        hp = self.pool.host
        if self._host is None:
            return 0 if hp is None else hp.num_free
        return self._host.num_free

    def swap_out(self, blocks: Sequence[int]) -> list[int] | None:
        """A host table holding the content of device ``blocks`` (one host
        reference per entry), the moves recorded; None, nothing changed, when
        the host tier lacks room. The caller frees the device blocks."""
        new = [b for b in blocks if b not in self._moved and b != HOLE]
        if len(new) > self.host_free():
            return None
        host, out = self.host, []
        for b in blocks:
            if b == HOLE:  # a hole stays a hole in the host table
                out.append(HOLE)
                continue
            h = self._moved.get(b)
            if h is None:
                h = self._moved[b] = host.take()
                self.swaps_out.append((b, h))
                host.incref(h)  # pinned until finish
                self.host_release.append(h)
            else:
                host.incref(h)
            out.append(h)
        return out

    def swap_in(self, host_table: Sequence[int], blocks: Sequence[int]) -> None:
        """Move host blocks into device ``blocks`` (already allocated); the
        host references are dropped at ``finish``."""
        for h, b in zip(host_table, blocks):
            if h == HOLE:
                continue
            self.swaps_in.append((h, b))
            self.host_release.append(h)

    def move_host_hits(self, hits: Sequence[int], blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Swap host-cached ``hits`` (pinned by the caller, before it allocated
        ``blocks``) into device ``blocks``, which take over their hashes."""
        host = self.host if hits else None
        for h, b, hsh in zip(hits, blocks, hashes):
            host.own()
            content = host.content[h]
            host.drop_cached(h)
            self.cache(b, hsh, content)
            self.swap_in((h,), (b,))

    def lookup_host(self, hashes: Iterable[bytes]) -> list[int]:
        """Host blocks of the longest prefix of ``hashes`` cached in the host tier."""
        hp = self.pool.host
        if hp is None or (self._host is None and not _has_cached(hp)):
            return []
        return self.host.lookup(hashes)

    def _offload(self, b: int) -> None:
        """Copy evicted cached block ``b`` to the host tier, when there is room."""
        if not self.host_free():
            return
        host = self.host
        h = host.take()
        host.cache(h, self.hash_of[b], self.content[b])
        self.swaps_out.append((b, h))
        self.host_release.append(h)

    def finish(self) -> BlockPool:
        host = self.pool.host
        if self.host_release or self._host is not None:
            for h in self.host_release:
                self.host.decref(h)
            host = self.host.finish()
        return _replace_pool(
            self.pool, free_stack=self.stack, num_stack=self.num_stack, fresh=self.fresh, lru_head=self.head,
            lru_tail=self.tail, num_lru=self.num_lru, host=host, maps=self.version,
        )


def _has_cached(pool: BlockPool) -> bool:
    """Whether ``pool`` caches any block (O(1))."""
    return pool.num_blocks > 0 and bool(pool.hash_of)


# -- pure wrappers ------------------------------------------------------------------


def allocate(pool: BlockPool, n: int) -> tuple[BlockPool, tuple[int, ...]] | None:
    """``n`` new blocks (reference count 1), or None with the pool unchanged."""
    e = PoolEdit(pool)
    got = e.allocate(n)
    return None if got is None else (e.finish(), tuple(got))


def free(pool: BlockPool, table: Iterable[int]) -> BlockPool:
    e = PoolEdit(pool)
    e.free_table(table)
    return e.finish()


def fork(pool: BlockPool, table: Iterable[int]) -> BlockPool:
    """A child sequence shares every block of ``table`` (one more reference each)."""
    e = PoolEdit(pool)
    for b in table:
        if b != HOLE:
            e.incref(b)
    return e.finish()


def make_writable(
    pool: BlockPool, table: tuple[int, ...], j: int
) -> tuple[BlockPool, tuple[int, ...], tuple[tuple[int, int], ...]] | None:
    """Copy-on-write of block ``j`` of ``table``: the new pool, table and copies, or None."""
    e = PoolEdit(pool)
    t, copies = list(table), []
    if not e.writable(t, j, copies):
        return None
    return e.finish(), tuple(t), tuple(copies)


def release_outside_window(
    pool: BlockPool, table: tuple[int, ...], pos: int, window: int | None
) -> tuple[BlockPool, tuple[int, ...]]:
    """:meth:`PoolEdit.punch` as a pure function: the new pool and table."""
    e = PoolEdit(pool)
    t = e.punch(tuple(table), pos, window)
    return e.finish(), t


def lookup_prefix(pool: BlockPool, hashes: Iterable[bytes]) -> tuple[int, ...]:
    out = []
    for h in hashes:
        b = pool.by_hash.get(h)
        if b is None:
            break
        out.append(b)
    return tuple(out)


def acquire(pool: BlockPool, blocks: Iterable[int]) -> BlockPool:
    """Take a reference on cached blocks found by :func:`lookup_prefix`."""
    return fork(pool, blocks)


def cache_blocks(pool: BlockPool, items: Iterable[tuple[int, bytes, tuple]]) -> BlockPool:
    """Register full blocks ``(block, hash, (parent, tokens, extra))`` in the prefix cache."""
    e = PoolEdit(pool)
    for b, h, content in items:
        e.cache(b, h, content)
    return e.finish()


def free_blocks(pool: BlockPool) -> list[int]:
    """Every free block id, in allocation order (for checks and display; O(pool))."""
    out = []
    cell = pool.free_stack
    while cell is not None:
        out.append(cell[0])
        cell = cell[1]
    out.extend(range(pool.fresh, pool.num_blocks))
    b = pool.lru_head
    while b != NO_BLOCK:
        out.append(b)
        b = pool.lru_next.get(b, NO_BLOCK)
    return out


# -- tiers (pure wrappers) -------------------------------------------------------------


def swap_out(pool: BlockPool, table: Sequence[int]) -> tuple[BlockPool, tuple[int, ...], tuple] | None:
    """Move a table's content to host blocks (device references dropped): the
    new pool, the host table and the (device, host) moves; None when the host
    tier lacks room (pool unchanged)."""
    e = PoolEdit(pool)
    got = e.swap_out(table)
    if got is None:
        return None
    e.free_table(table)
    return e.finish(), tuple(got), tuple(e.swaps_out)


def swap_in(pool: BlockPool, host_table: Sequence[int]) -> tuple[BlockPool, tuple[int, ...], tuple] | None:
    """Bring a host table back into new device blocks: the new pool, the
    device table and the (host, device) moves; None when the device lacks room.
    Holes stay holes."""
    e = PoolEdit(pool)
    holes = sum(1 for h in host_table if h == HOLE)
    got = e.allocate(len(host_table) - holes)
    if got is None:
        return None
    table = [HOLE] * holes + got
    e.swap_in(host_table, table)
    return e.finish(), tuple(table), tuple(e.swaps_in)


def allocate_offloading(pool: BlockPool, n: int) -> tuple[BlockPool, tuple[int, ...], tuple] | None:
    """:func:`allocate` with the host prefix cache on: evicted cached blocks
    are copied to the host tier; also returns the (device, host) moves."""
    e = PoolEdit(pool, offload=True)
    got = e.allocate(n)
    return None if got is None else (e.finish(), tuple(got), tuple(e.swaps_out))


def acquire_from_host(pool: BlockPool, hashes: Sequence[bytes]) -> tuple[BlockPool, tuple[int, ...], tuple, tuple] | None:
    """The longest prefix of ``hashes`` cached in the host tier, moved into
    new device blocks that take over the hashes: the new pool, the device
    blocks, the (device, host) offloads of cached device blocks that the
    allocation evicted, and the (host, device) moves, run in that order (as
    a plan's swap_out before its swap_in); None when nothing is found or the
    device lacks room."""
    e = PoolEdit(pool, offload=True)
    hits = e.lookup_host(hashes)
    if not hits or len(hits) > e.num_free:
        return None
    for h in hits:
        e.host.incref(h)
    fresh = e.allocate(len(hits))
    e.move_host_hits(hits, fresh, hashes)
    return e.finish(), tuple(fresh), tuple(e.swaps_out), tuple(e.swaps_in)
