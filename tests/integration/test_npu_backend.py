"""The npu backend's torch_npu call conventions, on CPU against the stand-in
module (tests/integration/fake_torch_npu.py): same logits as the torch
backend through prefill, mixed and pure-decode steps. Real-NPU tests run
only where torch_npu is installed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from fnllm.device.executor import ModelExecutor
from integration_support import Driver, Seq, make_plan, tokens

BLOCK = 128


def run_steps(ex: ModelExecutor) -> list[torch.Tensor]:
    drv = Driver(ex.num_blocks, BLOCK, seed=11)
    a, b, c = Seq(tokens(200, 21)), Seq(tokens(200, 22)), Seq(tokens(200, 23))
    plans = [
        [drv.row(a, 150), drv.row(b, 20, num_samples=0)],  # prefill, a crosses a block
        [drv.row(a, 1), drv.row(b, 30), drv.row(c, 7, num_samples=0)],  # mixed: decode + chunks
        [drv.row(c, 120)],  # chunk over cached context, crossing a block
    ]
    plans += [[drv.row(a, 1), drv.row(b, 1), drv.row(c, 1)] for _ in range(3)]  # pure decode
    return [ex.compute_logits(make_plan(rows)) for rows in plans]


def test_npu_backend_matches_torch_backend(tiny_pangu, fake_torch_npu):
    path, _ = tiny_pangu
    ref = ModelExecutor(path, device="cpu", num_blocks=8, block_size=BLOCK, attn_backend="torch")
    npu = ModelExecutor(path, device="cpu", num_blocks=8, block_size=BLOCK, attn_backend="npu")
    assert npu.backend.name == "npu"
    for want, got in zip(run_steps(ref), run_steps(npu)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for op in ("_npu_reshape_and_cache", "_npu_paged_attention", "npu_fused_infer_attention_score",
               "npu_rms_norm", "npu_add_rms_norm", "_npu_rotary_embedding", "npu_swiglu"):
        assert fake_torch_npu.calls.get(op, 0) > 0, op


def test_npu_backend_wants_block_128(tiny_pangu, fake_torch_npu):
    with pytest.raises(ValueError, match="block_size 128"):
        ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=8, block_size=16, attn_backend="npu")


def test_torch_npu_imported_lazily(tiny_pangu):
    sys.modules.pop("torch_npu", None)
    ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=4, block_size=16)
    assert "torch_npu" not in sys.modules


def test_unknown_backend(tiny_pangu):
    with pytest.raises(ValueError, match="unknown attention backend"):
        ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=4, block_size=16, attn_backend="flash")


has_npu = importlib.util.find_spec("torch_npu") is not None


@pytest.mark.npu
@pytest.mark.skipif(not has_npu, reason="torch_npu is not installed")
def test_real_npu_matches_cpu(tiny_pangu):
    path, _ = tiny_pangu
    ref = ModelExecutor(path, device="cpu", num_blocks=8, block_size=BLOCK)
    npu = ModelExecutor(path, device="npu", num_blocks=8, block_size=BLOCK)
    for want, got in zip(run_steps(ref), run_steps(npu)):
        torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3)


def windowed_steps(ex: ModelExecutor, window: int) -> list[torch.Tensor]:
    """Prefill, mixed and decode steps past the window, each table with holes
    before its row's first window block (as the core hands them)."""
    from fnllm.blocks import first_window_block
    from fnllm.state import HOLE

    drv = Driver(ex.num_blocks, BLOCK, seed=12)
    a, b = Seq(tokens(300, 41)), Seq(tokens(300, 42))
    plans = [[drv.row(a, 140), drv.row(b, 60, num_samples=0)], [drv.row(a, 1), drv.row(b, 130)]]
    plans += [[drv.row(a, 1), drv.row(b, 1)] for _ in range(3)]
    out = []
    for rows in plans:
        rows = [dict(r, block_tables=tuple(HOLE if j < first_window_block(r["positions"], window, BLOCK) else x
                                           for j, x in enumerate(r["block_tables"]))) for r in rows]
        out.append(ex.compute_logits(make_plan(rows)))
    return out


def test_npu_backend_sliding_window(tmp_path, fake_torch_npu, monkeypatch):
    """Mistral's window through the npu calls (band mode, BSH decode) matches the torch backend, holes included."""
    from integration_support import mistral_config, reference_model, write_checkpoint

    window = 40
    cfg = mistral_config(window)
    path = write_checkpoint(tmp_path / "mistral", cfg, reference_model(cfg, seed=6))
    monkeypatch.setenv("FNLLM_CPU_KERNELS", "0")
    ref = ModelExecutor(path, device="cpu", num_blocks=8, block_size=BLOCK, attn_backend="torch")
    npu = ModelExecutor(path, device="cpu", num_blocks=8, block_size=BLOCK, attn_backend="npu")
    want, got = windowed_steps(ref, window), windowed_steps(npu, window)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert fake_torch_npu.calls.get("npu_fused_infer_attention_score", 0) >= len(got)  # decode too, in BSH
    assert "_npu_paged_attention" not in fake_torch_npu.calls  # it has no window
