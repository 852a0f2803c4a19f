"""Model weights in transparent huge pages (CPU).

A batch-1 decode step streams every weight once: about 67,000 4-KiB pages
per token for the demo model in bf16, each a TLB miss and a page walk, and
the hardware prefetcher stops at each page's end. :func:`move_to_huge_pages`
copies tensors, in the order given, into one anonymous mapping aligned to
2 MiB and advised ``MADV_HUGEPAGE``, and points each tensor at its copy.

Invariants:

- Only where the bytes live changes: each tensor keeps its values, shape,
  dtype and identity (``Tensor.set_``), so whatever holds it (a backend's
  packed-weight table keyed by ``id``) sees the move.
- Only CPU tensors that are contiguous, strided and own their whole storage
  move (each once); any other tensor is left where it is.
- Best effort: where the kernel ignores the advice (THP set to ``never``, no
  ``madvise``) the mapping is ordinary pages and everything works the same.
  ``FNLLM_HUGE_PAGES=0`` turns the move off.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
ALIGN = 64  # each tensor's first byte, as torch's own allocator gives


def madvise_fn():
    """libc's ``madvise(addr, length, advice) -> int``; OSError or AttributeError where there is none."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def enabled() -> bool:
    return os.environ.get("FNLLM_HUGE_PAGES", "1") != "0"


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """``nbytes`` zero bytes (a uint8 tensor; rounded up to whole huge pages)
    starting on a 2 MiB boundary, advised ``MADV_HUGEPAGE`` where the kernel
    takes it. The mapping lives as long as the tensor and its views."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping
    skip = -raw.data_ptr() % HUGE_PAGE
    arena = raw[skip : skip + size]
    try:
        madvise_fn()(arena.data_ptr(), size, MADV_HUGEPAGE)  # a hint: a refusal leaves plain pages
    except (OSError, AttributeError):
        pass
    return arena


def _movable(t) -> bool:
    return (
        isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided and t.numel() > 0
        and t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    )


def move_to_huge_pages(tensors) -> int:
    """Move the movable ``tensors`` (in this order, each once) into one huge-page
    arena; return the bytes moved (0: nothing to move, or turned off)."""
    if not enabled():
        return 0
    todo = list({id(t): t for t in tensors if _movable(t)}.values())  # first occurrences, in order
    if not todo:
        return 0
    offsets, end = [], 0
    for t in todo:
        offsets.append(end)
        end += -(-t.nbytes // ALIGN) * ALIGN
    arena = huge_page_arena(end)
    with torch.no_grad():
        for t, at in zip(todo, offsets):
            copy = arena[at : at + t.nbytes].view(t.dtype).view(t.shape)
            copy.copy_(t)
            t.set_(copy.untyped_storage(), copy.storage_offset(), t.shape, t.stride())
    return sum(t.nbytes for t in todo)
