"""Persistent maps by rerooting (Baker's shallow binding; Conchon and
Filliâtre's persistent arrays): O(1) reads and writes whatever the size.

A *store* is a fixed tuple of plain dicts shared by all of its versions. One
version, the root, is what the dicts hold now. Every other version holds a
log that turns its neighbour towards the root into it (``_newer``, ``_log``:
a flat list of ``map index, key, old value or MISSING`` triples, applied
last first; flat, so a write leaves no new object for the cyclic GC).
Reading a version that is not the root first *reroots* the store to it:
applies the logs along the path and reverses the edges, O(changes between
the two versions). An engine reads its newest state, which is the root, so
its reads and writes cost one dict operation whatever the pool's size.

Invariants:

- A version's content never changes: rerooting moves which version the dicts
  hold, never what a version means (values compare, pickle and print as the
  content). Versions are immutable values; only their representation moves.
- An :class:`Edit` makes a new version on top of ``base`` at once (``base``
  then points at it with an empty log), so an edit that is dropped midway,
  for example by an exception, leaves a version nobody reads, and ``base``
  reads as before.
- An edit writes only while its version is the root (:meth:`Edit.own`
  reroots back if another version of the store was read meanwhile).
- Rerooting mutates the shared dicts: the versions of one store are read from
  one thread at a time (the engine's).
"""

from __future__ import annotations

from typing import Iterator, Mapping

MISSING = object()


class _Store:
    __slots__ = ("maps", "root")

    def __init__(self, maps: tuple[dict, ...]) -> None:
        self.maps = maps
        self.root: Version | None = None


class Version:
    """One immutable version of a store's maps (compare with ``==``; unhashable)."""

    __slots__ = ("_store", "_newer", "_log")

    def __init__(self, store: _Store) -> None:
        self._store = store
        self._newer: Version | None = None
        self._log: list | None = None

    def maps(self) -> tuple[dict, ...]:
        """The store's dicts holding this version (valid until another version is read)."""
        if self._store.root is not self:
            _reroot(self)
        return self._store.maps

    def snapshot(self) -> tuple[dict, ...]:
        return tuple(dict(m) for m in self.maps())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return other is self or self.snapshot() == other.snapshot()

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        return (from_maps, (self.snapshot(),))

    def __repr__(self) -> str:
        return f"Version({', '.join(str(len(m)) for m in self.maps())} entries)"


def new_store(n: int) -> Version:
    """The root version of a fresh store of ``n`` empty maps."""
    return from_maps(tuple({} for _ in range(n)))


def from_maps(maps: tuple[dict, ...]) -> Version:
    """The root version of a fresh store holding (copies of) ``maps``."""
    store = _Store(tuple(dict(m) for m in maps))
    store.root = v = Version(store)
    return v


def _reroot(v: Version) -> None:
    path = []
    u = v
    while u._newer is not None:
        path.append(u)
        u = u._newer
    if u is not v._store.root:
        raise RuntimeError("pmaps: a version's path does not end at its store's root")
    maps = v._store.maps
    for u in reversed(path):  # u._newer is the root now
        root, log, redo = u._newer, u._log, []
        for j in range(len(log) - 3, -1, -3):
            i, k, old = log[j], log[j + 1], log[j + 2]
            m = maps[i]
            redo.extend((i, k, m.get(k, MISSING)))
            if old is MISSING:
                del m[k]
            else:
                m[k] = old
        root._newer, root._log = u, redo
        u._newer = u._log = None
        v._store.root = u


class Edit:
    """A new version on top of ``base``, written in place: ``put``/``drop``
    log the old value. ``maps`` are the store's dicts, valid for reads after
    :meth:`own`."""

    __slots__ = ("version", "base", "maps", "log", "store")

    def __init__(self, base: Version) -> None:
        self.maps = base.maps()
        self.store = store = base._store
        self.base = base
        self.version = new = Version(store)
        base._newer, base._log = new, []
        store.root = new
        self.log = base._log

    def own(self) -> None:
        """Make this edit's version the root again (after a read of another version)."""
        if self.store.root is not self.version:
            _reroot(self.version)
            self.log = self.base._log

    def put(self, i: int, k, value) -> None:
        m = self.maps[i]
        self.log.extend((i, k, m.get(k, MISSING)))
        m[k] = value

    def drop(self, i: int, k) -> None:
        self.log.extend((i, k, self.maps[i].pop(k)))


class View(Mapping):
    """Read-only mapping view of map ``i`` of a version."""

    __slots__ = ("_v", "_i")

    def __init__(self, version: Version, i: int) -> None:
        self._v, self._i = version, i

    def _m(self) -> dict:
        return self._v.maps()[self._i]

    def __getitem__(self, k):
        return self._m()[k]

    def get(self, k, default=None):
        return self._m().get(k, default)

    def __contains__(self, k) -> bool:
        return k in self._m()

    def __len__(self) -> int:
        return len(self._m())

    def __iter__(self) -> Iterator:
        return iter(list(self._m()))

    def keys(self):
        return list(self._m())

    def items(self):
        return list(self._m().items())

    def values(self):
        return list(self._m().values())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"View({dict(self._m())!r})"
