"""Facts the hot paths derive from the core's immutable values, memoized by
the values' identity.

A decode step keeps most of ``Running``'s column tuples (the same objects)
and changes the rest in a way the fast paths know, so what a step derived
can be reused by the next one instead of recomputed with a pass over every
row. Each memo entry holds the objects it is keyed by, so an id is never
reused while its entry lives, and a hit returns exactly what recomputing
would (a pure function of immutable values); a miss recomputes. The memos
are small and bounded (cleared when full; those a step notes for the next
one keep two entries, so old values are not kept alive); none of this is
state.

- :func:`traits`: a summary of the ``sampling`` column;
  :func:`note_traits_after` derives a column's from the column it was made
  from (rows removed, rows appended).
- :func:`length_margin` / :func:`note_length_margin`: the fewest tokens any
  row may still append before ``max_tokens``.
- :func:`decode_ready` / :func:`note_decode_ready`: a ``Running`` whose every
  row has exactly one token to compute and at least one output.
- :func:`known_crossing` / :func:`note_crossing`: the rows of a plan whose new
  tokens complete a block.

:func:`one_token` interns the one-token tuples of decode rows' ``token_ids``
(at most one per vocabulary id, never collected), and :func:`filled`
the constant columns: a decode step builds hundreds of the former and a few
of the latter, and fresh ones would each be scanned by the cyclic GC.
"""

from __future__ import annotations

import functools
from itertools import compress
from operator import sub
from typing import NamedTuple

_SIZE = 8
_RECENT = 2  # facts a step notes for the next step only: older values may die
_TRAITS: dict[int, tuple] = {}
_MARGIN: dict[int, tuple] = {}
_READY: dict[int, object] = {}
_CROSSING: dict[int, tuple] = {}


def _put(memo: dict, key: object, value: tuple | object, size: int = _SIZE) -> None:
    if len(memo) >= size:
        memo.clear()
    memo[id(key)] = value


class Traits(NamedTuple):
    """``max_n``: the largest ``n``; ``guided`` / ``history``: whether any row
    is guided / reads its tokens when sampling; ``stop_ids``: every row's
    stop token ids; ``max_tokens``: the column of ``max_tokens``."""

    max_n: int
    guided: bool
    history: bool
    stop_ids: frozenset
    max_tokens: tuple[int, ...]

    @classmethod
    def of(cls, sampling: tuple) -> "Traits":
        """One pass over the rows (it runs mostly on the few rows a step
        admits; a whole column's traits are derived, see ``note_traits_after``)."""
        max_n, guided, history, stop_ids, max_tokens = 1, False, False, frozenset(), []
        for sp in sampling:
            if sp.n > max_n:
                max_n = sp.n
            if sp.guided_decoding is not None:
                guided = True
            if sp.needs_history:
                history = True
            if sp.stop_token_ids:
                stop_ids = stop_ids.union(sp.stop_token_ids)
            max_tokens.append(sp.max_tokens)
        return cls(max_n, guided, history, stop_ids, tuple(max_tokens))


def traits(sampling: tuple) -> Traits:
    """The :class:`Traits` of a sampling column."""
    hit = _TRAITS.get(id(sampling))
    if hit is not None and hit[0] is sampling:
        return hit[1]
    found = Traits.of(sampling)
    _put(_TRAITS, sampling, (sampling, found))
    return found


def note_traits_after(old: tuple, new: tuple, live: list) -> None:
    """Record the traits of ``new``: the sampling column ``old`` without its
    rows where ``live`` is False (``live[i]`` for row ``i`` of ``old``; a
    longer ``live`` covers appended rows too), then the appended rows, all
    in order. Derived from ``old``'s memoized traits with C-level passes and
    a summary of the appended rows only; nothing is noted when ``old``'s are
    unknown, or when a removed row may have set ``max_n``, ``guided``,
    ``history`` or ``stop_ids`` (those are then recomputed on demand)."""
    hit = _TRAITS.get(id(old))
    if hit is None or hit[0] is not old or new is old:
        return
    t = hit[1]
    kept = tuple(compress(t.max_tokens, live))
    if len(kept) < len(old) and (t.max_n > 1 or t.guided or t.history or t.stop_ids):
        return
    added = new[len(kept):]
    if not added:
        found = Traits(t.max_n, t.guided, t.history, t.stop_ids, kept)
    else:
        a = Traits.of(added)
        found = Traits(max(t.max_n, a.max_n), t.guided or a.guided, t.history or a.history, t.stop_ids | a.stop_ids,
                       kept + a.max_tokens)
    _put(_TRAITS, new, (new, found))


def length_margin(sampling: tuple, num_output: tuple) -> int:
    """``min(max_tokens - num_output)`` over the rows (a large number when none)."""
    hit = _MARGIN.get(id(num_output))
    if hit is not None and hit[0] is num_output and hit[1] is sampling:
        return hit[2]
    return min(map(sub, traits(sampling).max_tokens, num_output), default=1 << 62)


def note_length_margin(sampling: tuple, num_output: tuple, margin: int) -> None:
    """Record :func:`length_margin` of a column the caller derived it for."""
    _put(_MARGIN, num_output, (num_output, sampling, margin), _RECENT)


def decode_ready(running: object) -> bool:
    """Whether ``running`` was noted by :func:`note_decode_ready` (False: unknown)."""
    return _READY.get(id(running)) is running


def note_decode_ready(running: object) -> None:
    """Record that every row of ``running`` has one token to compute and an output."""
    _put(_READY, running, running, _RECENT)


def known_crossing(plan: object, block_size: int) -> list[int] | None:
    """The rows noted by :func:`note_crossing` for ``plan`` (None: unknown)."""
    hit = _CROSSING.get(id(plan))
    if hit is not None and hit[0] is plan and hit[1] == block_size:
        return hit[2]
    return None


def note_crossing(plan: object, block_size: int, rows: list[int]) -> None:
    """Record the rows of ``plan`` whose new tokens complete a block of ``block_size``."""
    _put(_CROSSING, plan, (plan, block_size, rows), _RECENT)


class _OneTokenTuples(dict):
    def __missing__(self, token: int) -> tuple[int]:
        one = self[token] = (token,)
        return one


one_token = _OneTokenTuples().__getitem__  # token -> (token,), the same object every time


@functools.lru_cache(maxsize=64)
def filled(value: object, n: int) -> tuple:
    """``(value,) * n`` for a hashable ``value``, the same tuple every time (a
    step's constant columns: all ones, all None)."""
    return (value,) * n
