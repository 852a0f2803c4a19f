"""One rank of a parallel model: ``Worker(rank, local_rank, distributed_init_method)``.

A worker joins the process group of its device (hccl / nccl / gloo, see
:mod:`fnllm.distributed`), loads only its shard of the weights (each tensor
sliced at load), allocates only its share of the KV cache (its KV heads, its
pipeline layers) and runs its part of every :class:`~fnllm.state.BatchPlan`
it is given. It never schedules: the driver's plan is the whole contract, the
same plan goes to every rank. Only the output rank (TP rank 0 of the last
pipeline stage) returns a :class:`~fnllm.state.StepOutput`; the others return
None. Sampling is a function of (seed, sample, position) and of the gathered
full logits, so the tokens do not depend on the layout.
"""

from __future__ import annotations

import os

import torch

from fnllm.state import BatchPlan, StepOutput


class Worker:
    def __init__(
        self,
        rank: int,
        local_rank: int,
        distributed_init_method: str,
        *,
        model: str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        dtype: str = "float32",
        device: str = "cpu",
        num_blocks: int,
        block_size: int = 16,
        seed: int = 0,
        attn_backend: str | None = None,
        num_threads: int | None = None,
        control_group: bool = False,
    ):
        self.rank, self.local_rank, self.init_method = rank, local_rank, distributed_init_method
        self.tp, self.pp = tensor_parallel_size, pipeline_parallel_size
        self.model_path, self.dtype, self.device = model, dtype, device
        self.num_blocks, self.block_size, self.seed, self.attn_backend = num_blocks, block_size, seed, attn_backend
        self.num_threads = num_threads
        self.control_group = control_group
        self.groups = None
        self.executor = None

    def init_device(self) -> None:
        """Join the world: the process group for this device, and the TP groups."""
        from fnllm.device.attention import resolve_device
        from fnllm.distributed import init_distributed

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        device = resolve_device(self.device)
        self.groups = init_distributed(
            self.rank, self.tp * self.pp, self.init_method, tp_size=self.tp, pp_size=self.pp, device=device,
            local_rank=self.local_rank, control_group=self.control_group,
        )

    def load_model(self) -> None:
        """Load this rank's shard and allocate its KV cache."""
        from fnllm.device.executor import ModelExecutor
        from fnllm.model.loader import open_checkpoint
        from fnllm.model.parallel import make_shard

        g = self.groups
        ckpt = open_checkpoint(self.model_path)
        shard = make_shard(ckpt.config, g.tp_rank, self.tp, g.pp_rank, self.pp)
        self.executor = ModelExecutor(
            ckpt, dtype=self.dtype, device=g.device.type, num_blocks=self.num_blocks,
            block_size=self.block_size, seed=self.seed, attn_backend=self.attn_backend, shard=shard, groups=g,
        )

    @property
    def is_output_rank(self) -> bool:
        return self.groups.pp_rank == self.pp - 1 and self.groups.tp_rank == 0

    # -- what the driver calls ---------------------------------------------------------

    def execute(self, plan: BatchPlan) -> StepOutput | None:
        out = self.executor.execute(plan)
        return out if self.is_output_rank else None

    def compute_logits(self, plan: BatchPlan) -> torch.Tensor | None:
        out = self.executor.compute_logits(plan)
        return out if self.is_output_rank else None

    def stats(self) -> dict:
        """This rank's shard and traffic: parameter and KV bytes, collectives so far."""
        from fnllm.distributed import comm_stats

        ex = self.executor
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in ex.model.parameters()}.values())
        kv = sum(c.numel() * c.element_size() for c in ex.kv_caches)
        s = ex.shard
        return {
            "rank": self.rank, "tp_rank": self.groups.tp_rank, "pp_rank": self.groups.pp_rank, "pid": os.getpid(),
            "layers": [s.layer_start, s.layer_end], "heads": s.num_heads, "kv_heads": s.num_kv_heads,
            "param_bytes": params, "kv_bytes": kv, "comm": comm_stats(), "backend": type(ex.backend).__name__,
        }

    def reset_stats(self) -> None:
        from fnllm.distributed import reset_comm_stats

        reset_comm_stats()

    def shutdown(self) -> None:
        from fnllm.distributed import destroy_distributed

        self.executor = None
        destroy_distributed()
