"""Executors: how a :class:`~fnllm.state.BatchPlan` reaches the model's workers.

- ``uni`` (:class:`UniProcExecutor`): the model in the driver's process (world size 1);
- ``mp`` (:class:`~fnllm.executor.multiproc.MultiprocExecutor`): one process per rank,
  started with torch.multiprocessing, plans over pipes;
- ``ray`` (:class:`~fnllm.executor.ray.RayDistributedExecutor`): one Ray actor per rank,
  placed with a placement group.

They differ only in transport: every rank gets the same plan, collectives go
through torch.distributed, and the output rank's :class:`~fnllm.state.StepOutput`
comes back. :func:`make_executor` picks one from a ``ParallelConfig``.
"""

from __future__ import annotations

from fnllm.executor.base import WorkerError, WorkerStepError, make_executor

__all__ = ["WorkerError", "WorkerStepError", "make_executor"]
