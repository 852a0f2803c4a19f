"""The CPU bitmask (a byte-indexed table of addends) equals xgrammar's own kernel, bit for bit."""

from __future__ import annotations

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from fnllm.device.guided import apply_bitmask_cpu  # noqa: E402


@pytest.mark.parametrize("vocab", [100, 49152, 49160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_bitmask_equals_xgrammar(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g).to(dtype)
    logits[1, :7] = float("-inf")  # already masked entries stay masked
    mask = torch.randint(-(2**31), 2**31 - 1, (8, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    rows = [0, 1, 3, 5]
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask_cpu(ours, mask, rows)
    xgr.apply_token_bitmask_inplace(theirs, mask, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[2], logits[2]) and torch.equal(ours[4], logits[4])  # rows not listed are untouched
