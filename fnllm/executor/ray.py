"""``RayDistributedExecutor``: one Ray actor per rank, placed with a placement group.

Ray only places the workers and carries the calls; the collectives between
them are torch.distributed's (rendezvous at rank 0's node on a free port).
The plan is put in Ray's object store once per step and every actor reads it.

Where Ray runs:
- already initialised in this process, or ``RAY_ADDRESS`` / ``ray_address``
  set (``"auto"``: the cluster this node joined with ``ray start``): that
  cluster is used, and left running at shutdown. fnllm and the model must be
  installed at the same paths on every node.
- otherwise a local Ray is started on demand (no dashboard, this host's CPUs)
  and stopped at shutdown.

Placement: one bundle per rank (``{"NPU": 1}``, ``{"GPU": 1}``, or a share of
the CPUs), strategy ``PACK``; ranks are numbered node by node (the driver's
node first), so a pipeline stage's TP group stays on one node when it fits.
Failure: a dead actor (``ActorDiedError``) or a step past ``step_timeout_s``
raises :class:`~fnllm.executor.base.WorkerError` naming the rank.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fnllm.config import ParallelConfig
from fnllm.executor.base import DEFAULT_START_TIMEOUT_S, DistributedExecutorBase, WorkerError, WorkerStepError

RAY_OBJECT_STORE_BYTES = 256 << 20
ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get to answer


class RayWorkerWrapper:
    """The actor: builds a :class:`~fnllm.device.worker.Worker` and calls its methods."""

    def __init__(self) -> None:
        self.worker = None

    def node_info(self) -> tuple[str, str]:
        import ray

        from fnllm.distributed import get_ip

        return ray.get_runtime_context().get_node_id(), get_ip()

    def free_port(self) -> int:
        from fnllm.distributed import get_open_port

        return get_open_port()

    def init_worker(self, rank: int, local_rank: int, init_method: str, kwargs: dict) -> int:
        from fnllm.device.worker import Worker

        self.worker = Worker(rank, local_rank, init_method, **kwargs)
        self.worker.init_device()
        self.worker.load_model()
        return os.getpid()

    def execute_method(self, method: str, *args):
        return getattr(self.worker, method)(*args)


def _start_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    root = str(Path(__file__).resolve().parents[2])  # so local workers import this fnllm
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             object_store_memory=RAY_OBJECT_STORE_BYTES, configure_logging=False)
    return True


def _bundles(device: str, world: int) -> tuple[list[dict], dict]:
    """Placement-group bundles and the matching actor options for ``world`` ranks."""
    if device in ("npu", "cuda"):
        key = "NPU" if device == "npu" else "GPU"
        opts = {"num_cpus": 0, "resources": {"NPU": 1}} if key == "NPU" else {"num_cpus": 0, "num_gpus": 1}
        return [{key: 1}] * world, opts
    import ray

    share = min(1.0, float(ray.available_resources().get("CPU", 1)) / world)
    share = int(share * 100) / 100  # Ray's resource granularity
    return [{"CPU": share}] * world, {"num_cpus": share}


class RayDistributedExecutor(DistributedExecutorBase):
    def __init__(self, model_path: str, parallel: ParallelConfig, *, ray_address: str | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S, **kw):
        super().__init__(model_path, parallel, **kw)
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.actors, self.pg = [], None
        self.started_ray = _start_ray(ray_address)
        try:
            device = self.worker_kwargs["device"]
            device = "cpu" if device == "auto" else device
            bundles, opts = _bundles(device, self.world_size)
            self.pg = placement_group(bundles, strategy="PACK")
            ray.get(self.pg.ready(), timeout=start_timeout_s)
            actor_cls = ray.remote(RayWorkerWrapper)
            actors = [
                actor_cls.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i)).remote()
                for i in range(self.world_size)
            ]
            self.actors = actors
            infos = ray.get([a.node_info.remote() for a in actors], timeout=start_timeout_s)
            self.actors, local_ranks, ip0 = self._order(actors, infos)
            port = ray.get(self.actors[0].free_port.remote(), timeout=start_timeout_s)
            self.pids = self._wait([
                a.init_worker.remote(rank, local_ranks[rank], f"tcp://{ip0}:{port}", self.worker_kwargs)
                for rank, a in enumerate(self.actors)
            ], start_timeout_s, "start")
        except BaseException:
            self.shutdown()
            raise

    @staticmethod
    def _order(actors, infos):
        """Ranks node by node, the driver's node first; local ranks within each node."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        nodes = sorted({n for n, _ in infos}, key=lambda n: (n != here, n))
        order = sorted(range(len(actors)), key=lambda i: nodes.index(infos[i][0]))
        local, seen = [], {}
        for i in order:
            node = infos[i][0]
            local.append(seen.get(node, 0))
            seen[node] = local[-1] + 1
        return [actors[i] for i in order], local, infos[order[0]][1]

    def _wait(self, refs: list, timeout: float, what: str) -> list:
        """Results in rank order; WorkerError naming the rank that died, failed or hung."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        index = {ref: r for r, ref in enumerate(refs)}
        results, pending = [None] * len(refs), list(refs)
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(index[p] for p in pending)
                if errors:
                    self._fail(f"worker rank {min(errors)} failed: {errors[min(errors)]}; ranks {late} stopped "
                               "answering after it")
                self._fail(f"worker rank(s) {late} did not answer {what!r} within {timeout:.0f} s (hung?)")
            r = index[ready[0]]
            try:
                results[r] = ray.get(ready[0], timeout=0)
            except RayActorError as e:
                self._fail(f"worker rank {r} died during {what!r} (Ray actor {e.__class__.__name__})")
            except RayTaskError as e:
                errors[r] = str(e)
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            except GetTimeoutError:
                self._fail(f"worker rank {r} did not answer {what!r}")
        if errors:
            message = f"worker rank {min(errors)} failed: {errors[min(errors)]}"
            if what == "start":
                self._fail(message)
            raise WorkerStepError(message)
        return results

    def _fail(self, message: str):
        self.dead = message
        self.shutdown()
        raise WorkerError(message)

    def _run(self, method: str, *args, timeout: float | None = None) -> list:
        import ray

        self._check_alive()
        args = tuple(ray.put(a) for a in args)  # once in the object store, read by every rank
        refs = [a.execute_method.remote(method, *args) for a in self.actors]
        return self._wait(refs, self.step_timeout_s if timeout is None else timeout, method)

    def shutdown(self) -> None:
        """Kill the actors, free the placement group, stop Ray if this executor started it."""
        import ray

        if self.dead is None:
            self.dead = "the executor was shut down"
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors = []
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if getattr(self, "started_ray", False):
            ray.shutdown()
            self.started_ray = False
