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
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from multiprocessing.connection import wait

from fnllm.config import ParallelConfig
from fnllm.executor.base import DEFAULT_START_TIMEOUT_S, DistributedExecutorBase, WorkerError

ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get to answer


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
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the driver is gone
        if method == "shutdown":
            break
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except Exception:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
    try:
        worker.shutdown()
    finally:
        conn.close()


class MultiprocExecutor(DistributedExecutorBase):
    def __init__(self, model_path: str, parallel: ParallelConfig, *, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 **kw):
        super().__init__(model_path, parallel, **kw)
        import torch.multiprocessing as mp

        from fnllm.distributed import get_open_port

        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        self.procs, self.conns = [], []
        try:
            for rank in range(self.world_size):
                parent, child = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker_main, name=f"fnllm-worker-{rank}", daemon=True,
                                args=(rank, rank, init_method, dict(self.worker_kwargs, num_threads=threads), child))
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self.pids = self._collect(start_timeout_s, "start")
        except BaseException:
            self.shutdown()
            raise

    # -- transport --------------------------------------------------------------------

    def _run(self, method: str, *args, timeout: float | None = None) -> list:
        self._check_alive()
        msg = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(msg)
            except (BrokenPipeError, OSError):
                self._fail(f"worker rank {rank} is gone ({self._exit_of(rank)})")
        return self._collect(self.step_timeout_s if timeout is None else timeout, method)

    def _exit_of(self, rank: int) -> str:
        p = self.procs[rank]
        p.join(0.5)
        return f"pid {p.pid}, exit code {p.exitcode}" if p.exitcode is not None else f"pid {p.pid}"

    def _collect(self, timeout: float, what: str) -> list:
        """Every rank's answer; raises WorkerError naming the rank that died, hung or failed."""
        results: list = [None] * self.world_size
        pending = set(range(self.world_size))
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while pending:
            by = {self.conns[r]: r for r in pending} | {self.procs[r].sentinel: r for r in pending}
            ready = wait(list(by), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending)
                if errors:
                    self._fail(f"{self._errors_text(errors)}; ranks {late} stopped answering after it")
                self._fail(f"worker rank(s) {late} did not answer {what!r} within {timeout:.0f} s (hung?)")
            for obj in ready:
                r = by[obj]
                if r not in pending:
                    continue
                conn = self.conns[r]
                if obj is not conn and not conn.poll():
                    self._fail(f"worker rank {r} died during {what!r} ({self._exit_of(r)})")
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._fail(f"worker rank {r} died during {what!r} ({self._exit_of(r)})")
                pending.discard(r)
                if status == "ok":
                    results[r] = value
                else:
                    errors[r] = value
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        if errors:
            if what == "start":
                self._fail(self._errors_text(errors))
            raise WorkerError(self._errors_text(errors))
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
        stop = pickle.dumps(("shutdown", ()))
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
