"""Host memory for the KV cache: zero pages mapped lazily, or up front.

:func:`zeros_lazy` gives a zero tensor whose pages the kernel maps only when
first written, so a 1 GiB cache costs no start-up time. The price moves to
the steps that first write each page; on a virtual machine whose memory the
host backs on demand that is about 4-18 us per 4 KiB page (a prefill of 150
tokens into fresh blocks of the demo model: ~1,000 faults, ~8 % of the step).
:func:`populate` maps a tensor's pages ahead of use with
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+): the kernel faults them in
without touching the data, so it is safe while other threads read and write
the tensor. A calibration, or a server that should not pay first-touch
faults on its first requests, populates; a one-shot run does not.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

from fnllm.device.huge_pages import madvise_fn

MADV_POPULATE_WRITE = 23  # linux/mman.h
CHUNK = 64 << 20  # bytes per madvise call


def zeros_lazy(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose host pages are touched only when written: on CPU,
    numpy's ``calloc`` maps fresh zero pages from the kernel, so a 1 GiB KV
    cache costs no start-up time and no resident memory until blocks are used
    (``torch.zeros`` writes every byte: about 0.7 s per GiB here). The data
    starts on a 64-byte boundary, as torch's own allocator gives."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + 64, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    return torch.from_numpy(raw[skip : skip + nbytes]).view(dtype).view(shape)


def populate(tensors) -> bool:
    """Map every page of these CPU tensors now (their data unchanged); False,
    nothing done, where the kernel lacks ``MADV_POPULATE_WRITE`` or a tensor
    is not on the CPU."""
    tensors = list(tensors)
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    try:
        madvise = madvise_fn()
    except (OSError, AttributeError):
        return False
    page = mmap.PAGESIZE
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = start - start % page, -(-end // page) * page
        for a in range(lo, hi, CHUNK):
            if madvise(a, min(CHUNK, hi - a), MADV_POPULATE_WRITE) != 0:
                return False
    return True
