"""Process groups and collectives, over ``torch.distributed``.

One world of ``tp * pp`` ranks, laid out as vLLM does: ``rank = pp_rank * tp +
tp_rank``, so the ranks of a pipeline stage are consecutive (on one node when
a node holds a whole stage). Every rank belongs to one tensor-parallel group
(its stage) and one pipeline group (its TP position across stages).

The collective backend follows the device: ``npu -> hccl`` (registered by
``import torch_npu``), ``cuda -> nccl``, ``cpu -> gloo``
(:func:`backend_for_device`); nothing else differs between them, so the gloo
runs on CPU exercise the same code as HCCL on NPUs. No collective is written
here by hand: all-reduce, gather, send and recv are torch.distributed's.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEVICE_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
DEFAULT_TIMEOUT_S = float(os.environ.get("FNLLM_DIST_TIMEOUT", "600"))


def _kind(device: str | torch.device) -> str:
    # a string is read without torch.device(), which knows "npu" only once torch_npu is imported
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def backend_for_device(device: str | torch.device) -> str:
    """The torch.distributed backend for a device type: hccl, nccl or gloo."""
    kind = _kind(device)
    if kind not in DEVICE_BACKENDS:
        raise ValueError(f"no collective backend for device {kind!r} (known: {sorted(DEVICE_BACKENDS)})")
    return DEVICE_BACKENDS[kind]


def device_for_rank(device: str | torch.device, local_rank: int) -> torch.device:
    """The device a rank computes on: its ``local_rank``-th accelerator on its node
    (made current), or the CPU."""
    kind = _kind(device)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        import torch_npu  # noqa: F401  registers torch.npu and the hccl backend

        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    elif kind == "cuda":
        torch.cuda.set_device(local_rank)
    return torch.device(kind, local_rank)


def get_open_port() -> int:
    """A free TCP port on this host (for a ``tcp://`` rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def get_ip() -> str:
    """This host's address as other nodes see it (``FNLLM_HOST_IP`` overrides)."""
    ip = os.environ.get("FNLLM_HOST_IP")
    if ip:
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass
class ParallelGroups:
    """One rank's place in the world and the groups it talks through."""

    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    tp_group: object | None  # a torch.distributed ProcessGroup (None when tp_size == 1)
    device: torch.device
    control_group: object | None = None  # gloo over every rank, for plans and replies (multi-node mp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_root(self) -> int:
        """The global rank of TP rank 0 in this rank's stage."""
        return self.pp_rank * self.tp_size

    @property
    def prev_rank(self) -> int:
        return self.rank - self.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp_size


def init_distributed(
    rank: int, world_size: int, init_method: str, *, tp_size: int, pp_size: int, device: str | torch.device = "cpu",
    local_rank: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S, control_group: bool = False,
) -> ParallelGroups:
    """Join the world (``init_method``: ``tcp://host:port`` or ``env://``) and
    build the TP groups (and, with ``control_group``, a gloo group over every
    rank that carries pickled objects). Every rank creates every group, in the same order."""
    if tp_size * pp_size != world_size:
        raise ValueError(f"tp_size {tp_size} x pp_size {pp_size} != world_size {world_size}")
    backend = backend_for_device(device)
    dev = device_for_rank(device, local_rank)
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    tp_group = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    ctrl = dist.new_group(list(range(world_size)), backend="gloo") if control_group else None
    return ParallelGroups(rank, world_size, tp_size, pp_size, tp_group, dev, ctrl)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives (thin: they only pick the group, and count) --------------------------------

_STATS: dict[str, float] = {}


def _count(kind: str, nbytes: int, t0: float) -> None:
    _STATS[kind + "_calls"] = _STATS.get(kind + "_calls", 0) + 1
    _STATS[kind + "_bytes"] = _STATS.get(kind + "_bytes", 0) + nbytes
    _STATS[kind + "_s"] = _STATS.get(kind + "_s", 0.0) + time.perf_counter() - t0


def comm_stats() -> dict[str, float]:
    """Calls, bytes and seconds per collective kind (all_reduce, gather, send, recv) in this process."""
    return dict(_STATS)


def reset_comm_stats() -> None:
    _STATS.clear()


def tp_all_reduce(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Sum ``x`` over the TP group, in place."""
    t0 = time.perf_counter()
    dist.all_reduce(x, group=groups.tp_group)
    _count("all_reduce", x.numel() * x.element_size(), t0)
    return x


def tp_gather(x: torch.Tensor, groups: ParallelGroups) -> list[torch.Tensor] | None:
    """Every TP rank's ``x`` (equal shapes), in TP-rank order, on TP rank 0; None elsewhere."""
    t0 = time.perf_counter()
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(groups.tp_size)] if groups.tp_rank == 0 else None
    dist.gather(x, out, dst=groups.tp_root, group=groups.tp_group)
    _count("gather", x.numel() * x.element_size(), t0)
    return out


def pp_send(tensors: list[torch.Tensor], groups: ParallelGroups) -> None:
    """Send to this TP position's rank in the next stage."""
    t0 = time.perf_counter()
    for t in tensors:
        dist.send(t.contiguous(), dst=groups.next_rank)
    _count("send", sum(t.numel() * t.element_size() for t in tensors), t0)


def pp_recv(shape: tuple[int, ...], dtype: torch.dtype, count: int, groups: ParallelGroups) -> list[torch.Tensor]:
    """Receive ``count`` tensors of ``shape`` from the previous stage."""
    t0 = time.perf_counter()
    out = []
    for _ in range(count):
        t = torch.empty(shape, dtype=dtype, device=groups.device)
        dist.recv(t, src=groups.prev_rank)
        out.append(t)
    _count("recv", sum(t.numel() * t.element_size() for t in out), t0)
    return out
