"""``replace(value, **changes)``: ``attrs.evolve`` for the core's hot paths.

The same result as ``attrs.evolve`` (a new frozen value, the named fields
changed, the rest shared), in about half the time: a function generated
once per class sets each field directly instead of looping over the
class's fields and calling its ``__init__``. Only for classes whose
``__init__`` does nothing else (no converter, validator or
``__attrs_post_init__``); any other class is refused with a ``TypeError``
when first used. An unknown field name is a ``TypeError``, as in ``evolve``.
:func:`replacer` hands out the generated function itself.

``replacer(cls, fields)`` changes only the named ``fields``: those must be
plain (no converter or validator) and the class must have no
``__attrs_post_init__``; the other fields may have converters or
validators, since they are copied from a value that already passed them.

:func:`slot_init` is the same idea for construction: a class decorator that
gives a plain frozen attrs class an ``__init__`` with attrs' signature
(positional or keyword-only parameters, the same defaults) setting each
slot through its descriptor, for the values a step builds by the hundred.
"""

from __future__ import annotations

import inspect
import types

import attrs

_SLOT = types.MemberDescriptorType
_REPLACERS: dict[object, object] = {}
_MISSING = object()


def _plain(cls: type, changed: tuple[str, ...] | None = None) -> bool:
    fields = attrs.fields(cls)
    return not hasattr(cls, "__attrs_post_init__") and all(
        f.converter is None and f.validator is None and f.init and f.alias == f.name
        for f in fields if changed is None or f.name in changed
    ) and (changed is None or set(changed) <= {f.name for f in fields})


def _setter(cls: type, name: str):
    """``set(obj, value)`` for field ``name``: the slot's own descriptor when
    the class has slots (skipping the frozen class's ``__setattr__`` and the
    lookup by name), else ``object.__setattr__``."""
    slot = inspect.getattr_static(cls, name, None)
    if type(slot) is _SLOT:
        return slot.__set__
    return lambda obj, value: object.__setattr__(obj, name, value)


def _generate(cls: type, changed: tuple[str, ...] | None):
    if not attrs.has(cls) or not _plain(cls, changed):
        raise TypeError(f"replace() needs a plain attrs class (no converter, validator or post-init): {cls.__name__}"
                        + (f", changing only plain fields among {changed}" if changed else ""))
    names = [f.name for f in attrs.fields(cls)]
    free = names if changed is None else [n for n in names if n in changed]
    params = ", ".join(f"{n}=_M" for n in free)
    sets = "\n".join(f"    _set_{n}(new, value.{n} if {n} is _M else {n})" if n in free
                     else f"    _set_{n}(new, value.{n})" for n in names)
    source = f"def replace(value, *, {params}):\n    new = _new(cls)\n{sets}\n    return new\n"
    scope = {"_M": _MISSING, "_new": object.__new__, "cls": cls}
    scope.update((f"_set_{n}", _setter(cls, n)) for n in names)
    exec(compile(source, f"<fnllm.replace {cls.__name__}>", "exec"), scope)  # noqa: S102 - generated from field names
    return scope["replace"]


def slot_init(cls: type) -> type:
    """Give ``cls`` (a plain, slotted attrs class whose defaults are values,
    not factories) an ``__init__`` that sets its slots directly; else ``TypeError``."""
    fields = attrs.fields(cls)
    if not _plain(cls) or hasattr(cls, "__attrs_pre_init__") or len({f.kw_only for f in fields}) > 1 or any(
        isinstance(f.default, attrs.Factory) or type(inspect.getattr_static(cls, f.name, None)) is not _SLOT
        for f in fields
    ):
        raise TypeError(f"slot_init() needs a plain slotted attrs class with value defaults: {cls.__name__}")
    params = [f.name if f.default is attrs.NOTHING else f"{f.name}=_d_{f.name}" for f in fields]
    star = "*, " if fields and all(f.kw_only for f in fields) else ""
    sets = "\n".join(f"    _set_{f.name}(self, {f.name})" for f in fields) or "    pass"
    source = f"def __init__(self, {star}{', '.join(params)}):\n{sets}\n"
    scope = {f"_d_{f.name}": f.default for f in fields}
    scope.update((f"_set_{f.name}", _setter(cls, f.name)) for f in fields)
    exec(compile(source, f"<fnllm.replace init {cls.__name__}>", "exec"), scope)  # noqa: S102 - from field names
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    return cls


def replacer(cls: type, fields: tuple[str, ...] | None = None):
    """The generated ``replace(value, **changes)`` of ``cls`` (for a hot path
    to hold); with ``fields``, one that changes only those."""
    key = cls if fields is None else (cls, tuple(fields))
    fn = _REPLACERS.get(key)
    if fn is None:
        fn = _REPLACERS[key] = _generate(cls, None if fields is None else tuple(fields))
    return fn


def replace(value, **changes):
    """``value`` with ``changes`` (see the module docstring)."""
    return replacer(value.__class__)(value, **changes)
