"""``small_linear`` (the few-row linear of batch-1 decode) against float64
matmuls, its column results independent of the row count, its input checks,
and the fused backend's use of it (only with the plain weights at hand)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.device import cpu_kernels
from fnllm.device.cpu_fused import SMALL_LINEAR_MAX_ROWS, FusedCpuBackend
from fnllm.model.model_config import DecoderConfig

K = cpu_kernels.load()
pytestmark = pytest.mark.skipif(K is None, reason="the fused CPU kernels did not build here")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


@settings(max_examples=30)
@given(m=st.integers(1, 6), n=st.integers(1, 70), k=st.integers(1, 200), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_matches_float64(m, n, k, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    got = K.small_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_the_same_in_any_row_count(dtype):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 576, generator=g).to(dtype), torch.randn(1000, 576, generator=g).to(dtype)
    alone = K.small_linear(x[2:3].contiguous(), w)
    for rows in (x[:3], x):
        assert torch.equal(K.small_linear(rows.contiguous(), w)[2], alone[0])


def test_rejects_bad_input():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        K.small_linear(x, torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        K.small_linear(x, w.bfloat16())
    with pytest.raises(RuntimeError, match="bias must be"):
        K.small_linear(x, w, torch.randn(3))
    with pytest.raises(RuntimeError, match="contiguous"):
        K.small_linear(x, torch.randn(8, 4).T)


def test_backend_uses_it_only_with_plain_weights(monkeypatch):
    cfg = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                        attention_bias=False)
    be = FusedCpuBackend(cfg, block_size=4, device=torch.device("cpu"), dtype=torch.bfloat16, kernels=K)
    assert be.keeps_row_major(1 << 20)
    w = torch.randn(96, 64).bfloat16()
    packed = torch.nn.Parameter(be.pack_weight(w), requires_grad=False) if be.packs_linears else w
    calls = []
    monkeypatch.setattr(be, "k", type("Spy", (), {"small_linear": lambda _, *a: calls.append(a) or K.small_linear(*a)})())
    x = torch.randn(SMALL_LINEAR_MAX_ROWS + 1, 64).bfloat16()
    if be.packs_linears:
        be.linear(x[:1], packed)  # the model's weights replaced by packed ones, no plain copy: oneDNN
        assert calls == []
        be.hold_packed([w])  # the model keeps the plain weight, the backend its packed copy
    torch.testing.assert_close(be.linear(x[:1], w).float(), (x[:1].float() @ w.float().T), atol=5e-2, rtol=2e-2)
    assert len(calls) == 1
    be.linear(x, w)  # more rows than SMALL_LINEAR_MAX_ROWS: the GEMM
    assert len(calls) == 1


def test_lazy_packing_same_tokens_and_packs_only_when_needed(monkeypatch, smollm2_path):
    """FNLLM_PACK_LINEAR=lazy (the CLI's generate): nothing is packed while every
    step is short; a long prompt packs on its first step; the tokens and
    logprobs equal those of packing at load."""
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    prompts = [{"prompt_token_ids": [1, 9906]}, {"prompt_token_ids": list(range(400, 440))}]
    with LLM(str(smollm2_path), dtype="bfloat16") as llm:
        want = [llm.generate([p], params)[0] for p in prompts]
    monkeypatch.setenv("FNLLM_PACK_LINEAR", "lazy")
    with LLM(str(smollm2_path), dtype="bfloat16") as llm:
        backend = llm.llm_engine.executor.backend
        got = [llm.generate([prompts[0]], params)[0]]
        assert backend._packed == {}  # a 2-token prompt and its decodes: small steps only
        got.append(llm.generate([prompts[1]], params)[0])
        assert backend._packed  # the 40-token prefill packed what it used
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs
