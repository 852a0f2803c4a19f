"""The KV cache's host memory: ``populate`` maps lazily mapped zero pages
ahead of use without changing a byte."""

import mmap
import resource
import sys

import pytest
import torch

from fnllm.device.kv_memory import populate


def _resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_maps_the_pages_and_keeps_the_data():
    # fresh anonymous pages (zeros_lazy's calloc may reuse memory an earlier test freed, already mapped)
    buf = mmap.mmap(-1, 16 << 20)
    t = torch.frombuffer(buf, dtype=torch.bfloat16).view(2, 2048, 16, 2, 64)  # 16 MiB of zeros
    t[0, 7] = 1.5  # written before: must survive
    expected = torch.zeros(t.shape, dtype=t.dtype)
    expected[0, 7] = 1.5
    rss = _resident_kib()  # (t is not read before populate: a read maps the shared zero page)
    if not populate([t]):
        pytest.skip("this kernel lacks MADV_POPULATE_WRITE (Linux < 5.14)")
    assert _resident_kib() - rss >= 12 * 1024  # the rest of the 16 MiB is now mapped
    assert torch.equal(t, expected)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t[1].fill_(2.0)  # writing the populated pages takes (almost) no page fault
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64
    assert float(t[0, 7].float().sum()) == 1.5 * 16 * 2 * 64


def test_populate_refuses_what_it_cannot_map():
    assert populate([]) is False
    assert populate([torch.zeros(4, device="meta")]) is False
