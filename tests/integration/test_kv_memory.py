"""The KV cache's host memory: lazily mapped zeros, and ``populate`` mapping
them ahead of use without changing a byte."""

import resource
import sys

import pytest
import torch

from fnllm.device.kv_memory import populate, zeros_lazy


def _resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_maps_the_pages_and_keeps_the_data():
    t = zeros_lazy((2, 512, 16, 2, 64), torch.bfloat16, "cpu")  # 4 MiB
    t[0, 7] = 1.5  # written before: must survive
    before = t.clone()
    rss = _resident_kib()
    if not populate([t]):
        pytest.skip("this kernel lacks MADV_POPULATE_WRITE (Linux < 5.14)")
    assert _resident_kib() - rss >= 3 * 1024  # most of the 4 MiB is now mapped
    assert torch.equal(t, before)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t[1].fill_(2.0)  # writing the populated pages takes (almost) no page fault
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64
    assert float(t[0, 7].float().sum()) == 1.5 * 16 * 2 * 64


def test_populate_refuses_what_it_cannot_map():
    assert populate([]) is False
    assert populate([torch.zeros(4, device="meta")]) is False
