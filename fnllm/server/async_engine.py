"""``AsyncLLMEngine``: an :class:`~fnllm.engine.LLMEngine` driven by one thread, used from asyncio.

Invariants:

- One background thread (the engine thread) is the only code that touches the
  ``LLMEngine``: it applies queued operations (adds, aborts) between steps and
  calls ``step()``. Coroutines only enqueue operations under a lock and read
  what the thread hands back.
- Each request has its own ``asyncio.Queue``, fed from the engine thread with
  ``loop.call_soon_threadsafe``; it receives cumulative ``RequestOutput``s and
  ends with a finished one, or with an exception (engine death).
- With no request live and no operation queued the thread waits on a
  condition variable: an idle engine uses no CPU.
- A stream that is closed before its request finished (a client went away, a
  task was cancelled) aborts the request; the abort is applied before the next
  step, which frees its KV blocks.
- Any exception escaping ``step()`` kills the engine: every live stream gets
  :class:`~fnllm.errors.EngineDeadError`, later calls raise it, and the
  ``on_dead`` callback runs once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import AsyncIterator, Callable

from fnllm.engine import LLMEngine, PromptType
from fnllm.errors import EngineDeadError
from fnllm.outputs import RequestOutput
from fnllm.state import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests already (HTTP 429)."""


class _Live:
    """One request as the engine thread sees it: where to deliver, and its timings."""

    __slots__ = ("request_id", "loop", "queue", "arrival", "first_token", "num_tokens", "finished")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id, self.loop = request_id, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.num_tokens = 0
        self.finished = False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    """vLLM's ``AsyncLLMEngine``: ``generate`` streams, ``abort`` aborts.

    ``stat_logger`` (optional) is called from the engine thread:
    ``on_step(state, running, waiting)`` after every loop turn,
    ``on_tokens(live, output, new_tokens, first, now)`` when a request got tokens,
    ``on_finished(live, output, now)`` (see :mod:`fnllm.server.metrics`).
    ``max_waiting`` bounds the requests queued but not yet running.
    """

    def __init__(
        self,
        engine: LLMEngine,
        *,
        max_waiting: int | None = None,
        stat_logger=None,
        on_dead: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_waiting = max_waiting
        self.stat_logger = stat_logger
        self.on_dead = on_dead
        self._cond = threading.Condition()
        self._ops: list[tuple] = []  # ("add", live, prompt, params, priority) | ("abort", id) | ("stop",)
        self._pending_adds = 0
        self._live: dict[str, _Live] = {}  # engine thread only
        self._ids: set[str] = set()  # ids in use (added, not yet finished); under _cond
        self._num_waiting = 0
        self._stopping = False
        self.dead_error: BaseException | None = None
        self.steps = 0  # loop turns that called step(): tests use it to see the idle thread sleep
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_llm(cls, llm, **kwargs) -> "AsyncLLMEngine":
        return cls(llm.llm_engine, **kwargs)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fnllm-engine", daemon=True)
                self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Abort every live request and stop the engine thread."""
        with self._cond:
            self._stopping = True
            self._ops.append(("stop",))
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def num_live(self) -> int:
        """Requests added (or being added) and not yet finished."""
        with self._cond:
            return len(self._ids)

    def num_waiting(self) -> int:
        """Requests not yet admitted to the running batch (queued adds included)."""
        return self._num_waiting + self._pending_adds

    # -- the asyncio side ------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError("the engine loop has died") from self.dead_error
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    async def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None, priority: int = 0
    ) -> "RequestStream":
        """Queue a request; its stream. Raises ``ValueError`` (bad input: nothing
        queued), :class:`QueueFullError`, or ``EngineDeadError``."""
        loop = asyncio.get_running_loop()
        self.start()
        live = _Live(request_id, loop)
        with self._cond:
            self._check_alive()
            if request_id in self._ids:
                raise ValueError(f"request_id {request_id!r} is already in use by a live request")
            if self.max_waiting is not None and self.num_waiting() >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self._ids.add(request_id)
            self._pending_adds += 1
            self._ops.append(("add", live, prompt, sampling_params, priority))
            self._cond.notify()
        stream = RequestStream(self, live)
        try:
            first = await stream.next_item()  # the ack: None, or the add's error
        except BaseException:  # cancelled while queued: do not leave the request behind
            stream.abort()
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        return stream

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams | None = None, request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative ``RequestOutput``s until the request finishes; closing the
        iterator early aborts the request."""
        rid = request_id if request_id is not None else f"req-{next(self._counter)}"
        stream = await self.add_request(rid, prompt, sampling_params, priority)
        async for out in stream:
            yield out

    async def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are harmless)."""
        self._post_abort(request_id)

    def abort_all(self) -> None:
        """Abort every live request (shutdown after the drain timeout)."""
        with self._cond:
            if self.dead_error is None:
                self._ops.extend(("abort", rid) for rid in sorted(self._ids))
                self._cond.notify()

    def _post_abort(self, request_id: str) -> None:
        with self._cond:
            if self.dead_error is None:
                self._ops.append(("abort", request_id))
                self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - any failure of step() (or of this loop) is the engine's death
            self._die(e)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._ops and not eng.has_unfinished_requests():
                    self._cond.wait()
                ops, self._ops = self._ops, []
            if self._apply(ops):
                self._stop_all()
                return
            if eng.has_unfinished_requests():
                outs = eng.step()
                self.steps += 1
                self._deliver(outs)
            self._publish()

    def _apply(self, ops: list[tuple]) -> bool:
        eng, stop = self.engine, False
        for op in ops:
            if op[0] == "add":
                _, live, prompt, params, priority = op
                with self._cond:
                    self._pending_adds -= 1
                try:
                    eng.add_request(live.request_id, prompt, params, priority)
                except Exception as e:  # noqa: BLE001 - bad input: handed back to the caller
                    self._forget(live.request_id)
                    live.put(e if isinstance(e, ValueError) else ValueError(str(e)))
                    continue
                self._live[live.request_id] = live
                live.put(None)
            elif op[0] == "abort":
                if op[1] in self._live:
                    eng.abort_request(op[1])
            else:
                stop = True
        return stop

    def _deliver(self, outs: list[RequestOutput]) -> None:
        now, logger = time.monotonic(), self.stat_logger
        for out in outs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            n = sum(len(c.token_ids) for c in out.outputs)
            first = bool(n) and live.first_token is None
            if first:
                live.first_token = now
            if logger is not None and n > live.num_tokens:
                logger.on_tokens(live, out, n - live.num_tokens, first, now)
            live.num_tokens = n
            if out.finished:
                live.finished = True
                del self._live[out.request_id]
                self._forget(out.request_id)
                if logger is not None:
                    logger.on_finished(live, out, now)
            live.put(out)

    def _publish(self) -> None:
        state = self.engine.state
        running = len(set(state.running.request_ids))
        self._num_waiting = len(state.requests) - running
        if self.stat_logger is not None:
            self.stat_logger.on_step(state, running, self._num_waiting)

    def _forget(self, request_id: str) -> None:
        with self._cond:
            self._ids.discard(request_id)

    def _stop_all(self) -> None:
        """Shutdown: abort every live request and deliver the final outputs."""
        eng = self.engine
        eng.abort_request(list(self._live))
        if eng.has_unfinished_requests():
            self._deliver(eng.step())
        self._publish()
        for live in list(self._live.values()):
            live.put(EngineDeadError("the engine has shut down"))

    def _die(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine loop died: {exc!r}")
        if err is not exc:
            err.__cause__ = exc
        with self._cond:
            self.dead_error = err
            ops, self._ops = self._ops, []
            self._ids.clear()
        try:
            if self.on_dead is not None:  # first: whoever sees the error can rely on it having run
                self.on_dead(err)
        finally:
            for op in ops:  # adds that will never be applied
                if op[0] == "add":
                    op[1].put(err)
            for live in self._live.values():
                live.put(err)
            self._live.clear()


class RequestStream:
    """Async iterator over one request's cumulative outputs; closing it before
    the request finished aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, live: _Live) -> None:
        self._engine, self._live = engine, live
        self.request_id = live.request_id
        self.finished = False

    async def next_item(self):
        return await self._live.queue.get()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._live.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            if not self.finished:
                self.finished = True
                self._engine._post_abort(self.request_id)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._post_abort(self.request_id)
