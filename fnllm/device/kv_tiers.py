"""The host KV tier: host tensors shaped like the device KV caches, and the
block moves a plan asks for.

One host tensor per layer, ``(2, num_host_blocks, block_size, num_kv_heads,
head_size)`` like the device's, in host memory (pinned when the device is
CUDA, so copies can overlap). :meth:`HostKV.apply` runs a plan's moves in
the order the core relies on: every ``swap_out`` (device -> host) first,
then every ``swap_in`` (host -> device), all layers, before the plan's
copies and forward. The memory is allocated empty (untouched pages cost no
resident memory until a block is written).
"""

from __future__ import annotations

import torch


def host_blocks_for_memory(memory_bytes: int, kv_block_bytes: int) -> int:
    """How many host blocks fit in ``memory_bytes`` (vLLM's ``swap_space``, in bytes)."""
    if memory_bytes < 0:
        raise ValueError(f"swap_space must be >= 0, got {memory_bytes} bytes")
    return int(memory_bytes) // kv_block_bytes


class HostKV:
    """Host copies of KV blocks for ``num_blocks`` host block ids."""

    def __init__(self, num_blocks: int, like: list[torch.Tensor]) -> None:
        self.num_blocks = num_blocks
        pin = bool(like) and like[0].device.type == "cuda"
        self.caches = [
            torch.empty((c.shape[0], num_blocks) + tuple(c.shape[2:]), dtype=c.dtype, device="cpu", pin_memory=pin)
            for c in like
        ]
        self.swapped_out = self.swapped_in = 0  # blocks moved, for tests and metrics

    @torch.inference_mode()
    def apply(self, device_caches: list[torch.Tensor], swap_out, swap_in) -> None:
        """Run ``swap_out`` ((device, host) pairs) then ``swap_in`` ((host, device) pairs)."""
        if swap_out:
            dev = torch.tensor([d for d, _ in swap_out], device=device_caches[0].device)
            host = torch.tensor([h for _, h in swap_out])
            for d_cache, h_cache in zip(device_caches, self.caches):
                h_cache[:, host] = d_cache[:, dev].to("cpu")
            self.swapped_out += len(swap_out)
        if swap_in:
            dev = torch.tensor([d for _, d in swap_in], device=device_caches[0].device)
            host = torch.tensor([h for h, _ in swap_in])
            for d_cache, h_cache in zip(device_caches, self.caches):
                d_cache[:, dev] = h_cache[:, host].to(d_cache.device, non_blocking=True)
            self.swapped_in += len(swap_in)

    @torch.inference_mode()
    def write(self, block: int, kv: torch.Tensor) -> None:
        """Fill host block ``block`` with ``kv`` ``(num_layers, 2, block_size, kv_heads, head_size)``."""
        for layer, h_cache in enumerate(self.caches):
            h_cache[:, block] = kv[layer]

    @staticmethod
    @torch.inference_mode()
    def read_device_block(device_caches: list[torch.Tensor], block: int) -> torch.Tensor:
        """A host copy of device block ``block``, all layers: ``(num_layers, 2, block_size, kv_heads, head_size)``."""
        return torch.stack([c[:, block] for c in device_caches]).to("cpu", copy=True)
