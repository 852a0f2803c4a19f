"""Weights in 2 MiB pages: ``move_to_huge_pages`` moves where the bytes live and
nothing else; the CPU executor moves its model's tensors before the
checkpoint fills them, with the same logits as without."""

from __future__ import annotations

import os

import pytest
import torch

from fnllm.cli import ONE_SHOT_ENV, _one_shot_env
from fnllm.device.executor import ModelExecutor
from fnllm.device.huge_pages import HUGE_PAGE, move_to_huge_pages
from integration_support import Driver, Seq, make_plan, tokens


def test_move_keeps_values_identity_and_packs_one_aligned_mapping(monkeypatch):
    monkeypatch.delenv("FNLLM_HUGE_PAGES", raising=False)  # on unless turned off
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 70, generator=g)
    b = torch.randn(33, generator=g).to(torch.bfloat16)
    c = torch.randint(0, 100, (5, 7), generator=g, dtype=torch.int32)
    before = [t.clone() for t in (a, b, c)]
    ids = [id(a), id(b), id(c)]
    moved = move_to_huge_pages([a, b, a, c])  # a twice: moved once
    assert moved == a.nbytes + b.nbytes + c.nbytes
    assert [id(t) for t in (a, b, c)] == ids
    for t, want in zip((a, b, c), before):
        assert t.dtype == want.dtype and t.shape == want.shape and t.is_contiguous() and torch.equal(t, want)
    ptrs = [t.data_ptr() for t in (a, b, c)]
    assert ptrs[0] % HUGE_PAGE == 0 and ptrs == sorted(ptrs) and all(p % 64 == 0 for p in ptrs)
    assert ptrs[-1] + c.nbytes - ptrs[0] < HUGE_PAGE  # one mapping, in the order given
    a.add_(1)  # the tensors stay writable where they now live
    assert torch.equal(a, before[0] + 1)


def test_tensors_that_do_not_own_their_storage_stay():
    base = torch.arange(64.0)
    view, strided = base[8:16], torch.arange(32.0).view(4, 8).t()
    meta = torch.empty(4, device="meta")
    where = [t.data_ptr() for t in (base, view, strided)]
    assert move_to_huge_pages([view, strided, meta]) == 0
    assert [t.data_ptr() for t in (base, view, strided)] == where
    assert torch.equal(view, torch.arange(8.0, 16.0))


def test_turned_off(monkeypatch):
    monkeypatch.setenv("FNLLM_HUGE_PAGES", "0")
    t = torch.ones(1000)
    where = t.data_ptr()
    assert move_to_huge_pages([t]) == 0 and t.data_ptr() == where


def _logits(monkeypatch, path, setting: str):
    monkeypatch.setenv("FNLLM_HUGE_PAGES", setting)
    ex = ModelExecutor(path, dtype="float32", device="cpu", num_blocks=32, block_size=4)
    drv = Driver(32, 4, seed=3)
    seq = Seq(tokens(21, 1))
    prefill = ex.compute_logits(make_plan([drv.row(seq, 21)]))
    seq.tokens.append(int(prefill[-1].argmax()))
    decode = ex.compute_logits(make_plan([drv.row(seq, 1)]))
    return ex, torch.cat([prefill, decode])


def test_cpu_executor_moves_its_weights_before_filling_them(monkeypatch, tiny_pangu):
    path, _ = tiny_pangu
    ex, on = _logits(monkeypatch, path, "1")
    _, off = _logits(monkeypatch, path, "0")
    tensors = {id(t): t for t in [*ex.model.parameters(), *ex.model.buffers()]}.values()
    assert ex.weight_bytes_in_huge_pages == sum(t.nbytes for t in tensors) > 0
    lo = min(t.data_ptr() for t in tensors)
    assert lo % HUGE_PAGE == 0
    assert max(t.data_ptr() + t.nbytes for t in tensors) - lo < ex.weight_bytes_in_huge_pages + 64 * len(tensors)
    assert torch.equal(on, off)


def test_one_shot_env_sets_what_the_user_left_unset(monkeypatch):
    monkeypatch.delenv("FNLLM_PACK_LINEAR", raising=False)
    monkeypatch.setenv("FNLLM_HUGE_PAGES", "1")  # the user's choice wins
    with _one_shot_env():
        assert os.environ["FNLLM_PACK_LINEAR"] == ONE_SHOT_ENV["FNLLM_PACK_LINEAR"]
        assert os.environ["FNLLM_HUGE_PAGES"] == "1"
    assert "FNLLM_PACK_LINEAR" not in os.environ and os.environ["FNLLM_HUGE_PAGES"] == "1"
    with pytest.raises(RuntimeError), _one_shot_env():
        raise RuntimeError("restored on the way out too")
    assert "FNLLM_PACK_LINEAR" not in os.environ
