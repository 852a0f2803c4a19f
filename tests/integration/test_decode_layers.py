"""``decode_layers``: the fused backend runs every decoder layer of a step whose
tokens are all decode rows in one kernel call. Its logits and the KV it writes
are bit-identical to the layer-by-layer path (the same kernels in the same
order), on Pangu (biases, untied) and Llama (tied) in float32 and bfloat16 and
on Mistral's sliding window; other steps keep the layer-by-layer path; bad
parameter lists are refused."""

from __future__ import annotations

import pytest
import torch

from fnllm.device import cpu_kernels
from fnllm.device.cpu import TorchBackend
from fnllm.device.cpu_fused import SMALL_LINEAR_MAX_ROWS
from fnllm.device.executor import ModelExecutor
from integration_support import Driver, Seq, make_plan, mistral_config, reference_model, tokens, write_checkpoint

K = cpu_kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason="the fused CPU kernels did not build here")
BLOCK, NUM_BLOCKS = 4, 96


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    cfg = mistral_config(6)
    return write_checkpoint(tmp_path_factory.mktemp("mistral6"), cfg, reference_model(cfg, seed=7)), None


def run(ex: ModelExecutor, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill ``prompts`` (one step), then ``steps`` decode steps of them all,
    each fed its greedy token; every step's logits."""
    drv = Driver(NUM_BLOCKS, BLOCK, seed=3)
    seqs = [Seq(list(p)) for p in prompts]
    out = [ex.compute_logits(make_plan([drv.row(s, len(s.tokens)) for s in seqs]))]
    for step in range(1, steps + 1):
        for s, row in zip(seqs, out[-1]):
            s.tokens.append(int(row.argmax()))
        out.append(ex.compute_logits(make_plan([drv.row(s, 1) for s in seqs], step=step)))
    return out


def both_paths(path, dtype: str, prompts, steps: int, monkeypatch):
    """Logits and KV caches with decode_layers, then with the layers one by one."""
    results = []
    for fused in (True, False):
        ex = ModelExecutor(path, dtype=dtype, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
        assert type(ex.backend).__name__ == "FusedCpuBackend"
        calls = []
        one_call = ex.backend.decode_layers if fused else TorchBackend.decode_layers.__get__(ex.backend)
        monkeypatch.setattr(ex.backend, "decode_layers", lambda *a: calls.append(1) or one_call(*a))
        got = run(ex, prompts, steps)
        assert len(calls) == steps + 1  # asked on every step (the prefill's answer is None)
        results.append((got, [c.clone() for c in ex.kv_caches]))
    return results


@pytest.mark.parametrize("ckpt", ["tiny_pangu", "tiny_llama", "tiny_mistral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, SMALL_LINEAR_MAX_ROWS])
def test_one_call_is_bit_identical(ckpt, dtype, rows, request, monkeypatch):
    path, _ = request.getfixturevalue(ckpt)
    prompts = [tokens(9 + 4 * i, 20 + i) for i in range(rows)]
    (fused, fused_kv), (plain, plain_kv) = both_paths(path, dtype, prompts, 12, monkeypatch)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    for a, b in zip(fused_kv, plain_kv):
        assert torch.equal(a, b)


def test_only_all_decode_steps_of_few_rows_take_it(tiny_llama, monkeypatch):
    ex = ModelExecutor(tiny_llama[0], dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK)
    taken = []
    real = ex.backend.decode_layers
    monkeypatch.setattr(ex.backend, "decode_layers", lambda *a: taken.append(real(*a) is not None) or real(*a))
    drv = Driver(NUM_BLOCKS, BLOCK, seed=3)
    seqs = [Seq(tokens(12, 40 + i)) for i in range(SMALL_LINEAR_MAX_ROWS + 1)]
    ex.compute_logits(make_plan([drv.row(s, 7) for s in seqs]))  # prompt chunks
    ex.compute_logits(make_plan([drv.row(s, 1) for s in seqs[:2]], step=1))  # two decode rows
    ex.compute_logits(make_plan([drv.row(seqs[2], 1), drv.row(Seq(tokens(5, 50)), 5)], step=2))  # mixed
    ex.compute_logits(make_plan([drv.row(s, 1) for s in seqs], step=3))  # more rows than small_linear takes
    assert taken == [False, True, False, False]


def test_bad_parameter_lists_are_refused(tiny_llama):
    ex = ModelExecutor(tiny_llama[0], dtype="float32", device="cpu", num_blocks=8, block_size=BLOCK)
    layers, be = ex.model.layers, ex.backend
    params = [p for layer in layers for p in layer.decode_params()]
    x = torch.randn(1, ex.config.hidden_size)
    args = (torch.zeros(1, dtype=torch.int64), ex.model.cos_sin_cache.float().contiguous(), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
            be.num_heads, be.num_kv_heads, 1e-6, be.scale, 0)
    with pytest.raises(RuntimeError, match="8 params per layer needed"):
        K.decode_layers(x, None, params[:-1], ex.kv_caches, *args)
    with pytest.raises(RuntimeError, match="param 0 of layer 1 is missing"):
        K.decode_layers(x, None, params[:8] + [None] + params[9:], ex.kv_caches, *args)
