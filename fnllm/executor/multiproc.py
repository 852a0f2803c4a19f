"""``MultiprocExecutor``: one process per rank on this node, started with
torch.multiprocessing (spawn), each running a :class:`~fnllm.device.worker.Worker`.

Transport: one duplex pipe per worker. A call is pickled once and written to
every pipe (the plan is plain data); each worker answers ``("ok", result)`` or
``("error", traceback)``. Collectives between workers go through
torch.distributed (rendezvous on a free local TCP port).

Failure: the driver waits on the pipes *and* the processes' sentinels with a
deadline, so a worker that dies is seen at once and one that hangs within
``step_timeout_s``; either raises :class:`~fnllm.executor.base.WorkerError`
naming the rank, and every worker is then stopped (terminate, then kill). A
worker whose driver disappears sees its pipe close and exits; workers are
daemonic, so a driver that exits normally takes them with it. No orphans.

Several nodes (torchrun-style: ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``): node 0 runs the driver and ranks ``0..world/nnodes-1``;
every other node runs ``python -m fnllm.headless`` (headless, the
same model arguments), which starts its own ranks. Rank 0 then relays each
call to every rank with ``broadcast_object_list`` and gathers their answers
with ``gather_object`` over a gloo group, and answers the driver for all of
them; a rank on another node that dies or hangs shows as a step past the timeout.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from multiprocessing.connection import wait

from fnllm.config import ParallelConfig
from fnllm.executor.base import DEFAULT_START_TIMEOUT_S, DistributedExecutorBase, WorkerError, WorkerStepError

ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get to answer


SHUTDOWN = pickle.dumps(("shutdown", ()))


def _worker_main(rank: int, local_rank: int, init_method: str, kwargs: dict, conn) -> None:
    """A worker process: build the worker, then serve calls until told to stop or the driver goes."""
    from fnllm.device.worker import Worker

    try:
        worker = Worker(rank, local_rank, init_method, **kwargs)
        worker.init_device()
        worker.load_model()
        conn.send(("ok", os.getpid()))
    except BaseException:
        conn.send(("error", f"rank {rank} failed to start:\n{traceback.format_exc()}"))
        return
    relay = worker.groups.control_group is not None
    while True:
        msg = _next_call(conn, worker, rank, relay)
        if msg is None:
            break
        method, args = pickle.loads(msg)
        if method == "shutdown":
            break
        try:
            reply = ("ok", getattr(worker, method)(*args))
        except Exception:
            reply = ("error", f"rank {rank}: {traceback.format_exc()}")
        if relay:
            reply = _gather_replies(reply, worker, rank)
        if reply is not None:
            conn.send(reply)
    try:
        worker.shutdown()
    finally:
        conn.close()


def _next_call(conn, worker, rank: int, relay: bool) -> bytes | None:
    """The next call's bytes: from the driver's pipe, or (several nodes) from rank 0's broadcast."""
    msg = None
    if not relay or rank == 0:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            if not relay:
                return None  # the driver is gone
            msg = SHUTDOWN  # ... and rank 0 tells every node
    if relay:
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0, group=worker.groups.control_group)
        msg = box[0]
    return msg


def _gather_replies(reply, worker, rank: int):
    """Every rank's reply, on rank 0 (which answers the driver for all); None elsewhere."""
    import torch.distributed as dist

    replies = [None] * worker.groups.world_size if rank == 0 else None
    dist.gather_object(reply, replies, dst=0, group=worker.groups.control_group)
    return ("all", replies) if rank == 0 else None


class MultiprocExecutor(DistributedExecutorBase):
    def __init__(self, model_path: str, parallel: ParallelConfig, *, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 nnodes: int | None = None, node_rank: int | None = None, **kw):
        super().__init__(model_path, parallel, **kw)
        self.nnodes = int(os.environ.get("NNODES", "1")) if nnodes is None else nnodes
        self.node_rank = int(os.environ.get("NODE_RANK", "0")) if node_rank is None else node_rank
        if self.world_size % self.nnodes:
            raise ValueError(f"a world of {self.world_size} ranks does not split over {self.nnodes} nodes")
        self.per_node = self.world_size // self.nnodes
        self.procs, self.conns = [], []
        try:
            self._start_local_workers()
            self.pids = self._collect(start_timeout_s, "start")
        except BaseException:
            self.shutdown()
            raise

    def _start_local_workers(self) -> None:
        """This node's ranks, ``node_rank * per_node ...``, as spawned processes."""
        import torch.multiprocessing as mp

        from fnllm.distributed import get_open_port

        ctx = mp.get_context("spawn")
        if self.nnodes > 1:
            init_method = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        else:
            init_method = f"tcp://127.0.0.1:{get_open_port()}"
        kwargs = dict(self.worker_kwargs, num_threads=max(1, (os.cpu_count() or 1) // self.per_node),
                      control_group=self.nnodes > 1)
        for local in range(self.per_node):
            rank = self.node_rank * self.per_node + local
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, name=f"fnllm-worker-{rank}", daemon=True,
                            args=(rank, local, init_method, kwargs, child))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    # -- transport --------------------------------------------------------------------

    def _run(self, method: str, *args, timeout: float | None = None) -> list:
        self._check_alive()
        msg = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        targets = self.conns if self.nnodes == 1 else self.conns[:1]  # several nodes: rank 0 relays
        for rank, conn in enumerate(targets):
            try:
                conn.send_bytes(msg)
            except (BrokenPipeError, OSError):
                self._fail(f"worker rank {rank} is gone ({self._exit_of(rank)})")
        results = self._collect(self.step_timeout_s if timeout is None else timeout, method,
                                only_rank0=self.nnodes > 1)
        return results

    def _exit_of(self, rank: int) -> str:
        p = self.procs[rank]
        p.join(0.5)
        return f"pid {p.pid}, exit code {p.exitcode}" if p.exitcode is not None else f"pid {p.pid}"

    def _collect(self, timeout: float, what: str, only_rank0: bool = False) -> list:
        """Every rank's answer; raises WorkerError naming the rank that died, hung or failed.
        (Local ranks are this node's; with ``only_rank0`` rank 0 answers for every node.)"""
        results: list = [None] * len(self.procs)
        pending = {0} if only_rank0 else set(range(len(self.procs)))
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        watch = set(range(len(self.procs))) if only_rank0 else pending  # a local rank that dies is seen at once
        while pending:
            by = {self.conns[r]: r for r in pending} | {self.procs[r].sentinel: r for r in watch}
            ready = wait(list(by), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending)
                if errors:
                    self._fail(f"{self._errors_text(errors)}; ranks {late} stopped answering after it")
                self._fail(f"worker rank(s) {late} did not answer {what!r} within {timeout:.0f} s (hung?)")
            for obj in ready:
                r = by[obj]
                conn = self.conns[r]
                if obj is not conn:  # a process ended: fine only if its answer is waiting to be read
                    if r in pending and conn.poll():
                        pass
                    elif r in pending or (only_rank0 and r != 0):
                        self._fail(f"worker rank {r} died during {what!r} ({self._exit_of(r)})")
                if r not in pending:
                    continue
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"worker rank {r} died during {what!r} ({self._exit_of(r)})")
                pending.discard(r)
                if status == "all":  # rank 0's relay: every rank's (status, value)
                    results = [v for _, v in value]
                    errors.update({i: v for i, (st, v) in enumerate(value) if st != "ok"})
                elif status == "ok":
                    results[r] = value
                else:
                    errors[r] = value
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        if errors:
            if what == "start":
                self._fail(self._errors_text(errors))
            raise WorkerStepError(self._errors_text(errors))
        return results

    @staticmethod
    def _errors_text(errors: dict[int, str]) -> str:
        first = min(errors)
        return f"worker rank {first} failed: {errors[first].strip()}"

    def _fail(self, message: str):
        self.dead = message
        self.shutdown(timeout=1.0)  # the group is broken: little patience for a polite exit
        raise WorkerError(message)

    # -- lifecycle --------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker (politely, then terminate, then kill); idempotent."""
        procs, conns = getattr(self, "procs", []), getattr(self, "conns", [])
        if self.dead is None:
            self.dead = "the executor was shut down"
        stop = SHUTDOWN
        for p, conn in zip(procs, conns):
            if p.is_alive():
                try:
                    conn.send_bytes(stop)
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for conn in conns:
            conn.close()
        self.procs, self.conns = [], []
