"""Attention backends and their selection (vLLM's ``get_attn_backend``).

A backend supplies every op of the decoder that depends on the device or the
paged KV layout: ``prepare`` (host batch -> per-step metadata, built once and
shared by all layers), ``rms_norm``, ``add_rms_norm``, ``silu_mul``,
``rope_qkv`` (split the fused qkv projection, rotate q and k) and
``attention`` (write the new K/V into their slots, then attend over each
row's cached context plus its new tokens, causally). A layer's KV cache is
``(2, num_blocks, block_size, num_kv_heads, head_size)``.

Backends: ``torch`` (plain torch: CPU and CUDA; on CPU with fused C++
kernels when they build, :mod:`fnllm.device.cpu_fused`) and ``npu`` (torch_npu fused
operators; torch_npu is imported only when that backend is built).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fnllm.model.model_config import DecoderConfig

BACKENDS = ("torch", "npu")


def npu_available() -> bool:
    """Whether torch_npu is installed (found without importing it)."""
    return importlib.util.find_spec("torch_npu") is not None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks npu, then cuda, then cpu."""
    if name == "auto":
        if npu_available():
            from fnllm.device.npu import npu_device_available

            if npu_device_available():
                return torch.device("npu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda", "npu"):
        raise ValueError(f"device must be one of auto, cpu, cuda, npu; got {name!r}")
    if name == "npu" and not npu_available():
        raise ValueError("device 'npu' needs torch_npu, which is not installed")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    return torch.device(name)


def get_attn_backend(
    device: torch.device | str,
    name: str | None = None,
    *,
    cfg: DecoderConfig,
    block_size: int,
    dtype: torch.dtype,
    batch_invariant: bool = False,
):
    """The backend for ``device``: ``name`` (or ``$FNLLM_ATTN_BACKEND``) when
    given, else ``npu`` on an NPU and ``torch`` elsewhere. ``batch_invariant``
    needs the fused CPU kernels (CPU, float32 or bfloat16)."""
    device = torch.device(device)
    name = name or os.environ.get("FNLLM_ATTN_BACKEND") or ("npu" if device.type == "npu" else "torch")
    if batch_invariant:
        return _batch_invariant_backend(device, name, cfg=cfg, block_size=block_size, dtype=dtype)
    if name == "torch":
        from fnllm.device.cpu import TorchBackend

        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from fnllm.device import cpu_kernels

            kernels = cpu_kernels.load()
            if kernels is not None:
                from fnllm.device.cpu_fused import FusedCpuBackend

                return FusedCpuBackend(cfg, block_size=block_size, device=device, dtype=dtype, kernels=kernels)
        return TorchBackend(cfg, block_size=block_size, device=device, dtype=dtype)
    if name == "npu":
        from fnllm.device.npu import NpuBackend

        return NpuBackend(cfg, block_size=block_size, device=device, dtype=dtype)
    raise ValueError(f"unknown attention backend {name!r} (choose from {BACKENDS})")


def _batch_invariant_backend(device: torch.device, name: str, *, cfg, block_size: int, dtype: torch.dtype):
    if name != "torch" or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"batch_invariant=True runs on the CPU torch backend in float32 or bfloat16; got backend {name!r}, "
            f"device {device.type}, dtype {str(dtype).removeprefix('torch.')}"
        )
    from fnllm.device import cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        raise ValueError("batch_invariant=True needs fnllm's fused CPU kernels, which are not available "
                         "(FNLLM_CPU_KERNELS=0, or no C++ compiler: see README, Performance)")
    from fnllm.device.cpu_fused import FusedCpuBackend

    return FusedCpuBackend(cfg, block_size=block_size, device=device, dtype=dtype, kernels=kernels,
                           batch_invariant=True)
