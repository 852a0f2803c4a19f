"""What every executor shares: the model's facts, the KV sizing, the output rank.

The driver never loads weights: it opens the checkpoint's index (config and
tensor shapes, validated), checks that the model splits over the layout
(``ParallelConfig.verify_with_model``), sizes the KV cache so that every
rank's share fits ``kv_cache_bytes`` (bytes *per rank*, as a device's memory
budget), and hands each worker the same arguments. A step sends the plan to
every rank and returns the output rank's answer.
"""

from __future__ import annotations

import os
from typing import Any

from fnllm.config import ParallelConfig
from fnllm.errors import EngineDeadError
from fnllm.model.model_config import ModelFacts
from fnllm.state import BatchPlan, StepOutput

DEFAULT_STEP_TIMEOUT_S = float(os.environ.get("FNLLM_WORKER_TIMEOUT", "120"))
DEFAULT_START_TIMEOUT_S = float(os.environ.get("FNLLM_WORKER_START_TIMEOUT", "600"))


class WorkerError(EngineDeadError):
    """A worker died or stopped answering; the message names the rank. The
    executor cannot run again, so it is the engine's death (no retry)."""


class WorkerStepError(RuntimeError):
    """Every worker answered but a step raised on some rank (the message names
    it): the workers live, so the engine may retry and isolate the request."""


def rank_kv_block_bytes(cfg, parallel: ParallelConfig, block_size: int, element_size: int) -> int:
    """The most bytes one KV block takes on any rank (its KV heads, its layers)."""
    from fnllm.model.parallel import local_config, make_shard

    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    return max(
        local_config(cfg, make_shard(cfg, 0, tp, s, pp)).kv_block_bytes(block_size, element_size) for s in range(pp)
    )


class DistributedExecutorBase(ModelFacts):
    """The driver's side of a worker group (subclasses supply the transport: ``_run``)."""

    def __init__(
        self,
        model_path: str,
        parallel: ParallelConfig,
        *,
        dtype: str = "float32",
        device: str = "auto",
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        seed: int = 0,
        attn_backend: str | None = None,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    ):
        import torch

        from fnllm.model.loader import open_checkpoint, torch_dtype

        ckpt = open_checkpoint(model_path)
        self.config = ckpt.config
        self.model_path = ckpt.path
        self.parallel = parallel
        parallel.verify_with_model(
            num_heads=self.config.num_heads, num_kv_heads=self.config.num_kv_heads,
            num_layers=self.config.num_layers, intermediate_size=self.config.intermediate_size,
        )
        self.world_size = parallel.world_size
        self.block_size, self.seed, self.step_timeout_s = block_size, seed, step_timeout_s
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("give num_blocks or kv_cache_bytes")
            element = torch.empty((), dtype=torch_dtype(dtype)).element_size()
            num_blocks = int(kv_cache_bytes) // rank_kv_block_bytes(self.config, parallel, block_size, element)
        if num_blocks < 1:
            raise ValueError(f"KV cache memory holds no block of {block_size} tokens (num_blocks={num_blocks})")
        self.num_blocks = num_blocks
        self.worker_kwargs: dict[str, Any] = dict(
            model=self.model_path, tensor_parallel_size=parallel.tensor_parallel_size,
            pipeline_parallel_size=parallel.pipeline_parallel_size, dtype=dtype, device=device,
            num_blocks=num_blocks, block_size=block_size, seed=seed, attn_backend=attn_backend,
        )
        self.dead: str | None = None

    # -- what the engine needs to know (vocab_size, eos ids, ...: ModelFacts) -----------------

    @property
    def output_rank(self) -> int:
        """TP rank 0 of the last pipeline stage: it gathers the logits and samples."""
        return (self.parallel.pipeline_parallel_size - 1) * self.parallel.tensor_parallel_size

    # -- steps ------------------------------------------------------------------------

    def _run(self, method: str, *args, timeout: float | None = None) -> list:
        """Call ``method(*args)`` on every worker; their results in rank order."""
        raise NotImplementedError

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(f"the workers are gone: {self.dead}")

    def execute(self, plan: BatchPlan) -> StepOutput:
        return self._run("execute", plan)[self.output_rank]

    def compute_logits(self, plan: BatchPlan):
        return self._run("compute_logits", plan)[self.output_rank]

    def worker_stats(self) -> list[dict]:
        """Per rank: its layers, heads, parameter and KV bytes, collective traffic."""
        return self._run("stats")

    def reset_worker_stats(self) -> None:
        self._run("reset_stats")

    def shutdown(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def make_executor(model_path: str, parallel: ParallelConfig, **kw):
    """The executor ``parallel.backend`` names (uni, mp or ray)."""
    backend = parallel.backend
    if backend == "uni":
        from fnllm.executor.uniproc import UniProcExecutor

        kw.pop("step_timeout_s", None)
        return UniProcExecutor(model_path, **kw)
    if backend == "mp":
        from fnllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(model_path, parallel, **kw)
    from fnllm.executor.ray import RayDistributedExecutor

    return RayDistributedExecutor(model_path, parallel, **kw)
