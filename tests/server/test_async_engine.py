"""AsyncLLMEngine over the stand-in device: streaming, abort, idle sleep,
queue bound, engine death. No model, no HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.errors import EngineDeadError
from fnllm.server.async_engine import AsyncLLMEngine, QueueFullError
from fnllm.state import SamplingParams

VOCAB = 97


def make_engine(executor=None, failures: int = 3, **kw) -> AsyncLLMEngine:
    config = EngineConfig(model=ModelConfig(vocab_size=VOCAB, eos_token_ids=(0,)),
                          cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64))
    engine = LLMEngine(config, executor or FakeExecutor(64, 4, vocab_size=VOCAB), max_consecutive_failures=failures)
    return AsyncLLMEngine(engine, **kw)


def params(n_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n_tokens, ignore_eos=True, temperature=0.0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_generate_streams_cumulative_outputs_like_the_sync_engine():
    engine = make_engine()
    sync = make_engine().engine

    async def main():
        return [out async for out in engine.generate([5, 6, 7], params(6), "a")]

    outs = run(main())
    sync.add_request("a", [5, 6, 7], params(6))
    while sync.has_unfinished_requests():
        want = [o for o in sync.step() if o.finished]
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 7))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert engine.num_live() == 0
    engine.shutdown()


def test_closing_a_stream_aborts_its_request_and_frees_its_blocks():
    engine = make_engine()

    async def main():
        gen = engine.generate([1, 2, 3, 4, 5], params(40), "a")
        async for out in gen:
            if len(out.outputs[0].token_ids) == 3:
                break
        await gen.aclose()
        other = [o async for o in engine.generate([9, 9], params(4), "b")]  # the engine keeps serving
        return other

    other = run(main())
    assert other[-1].finished
    deadline = time.monotonic() + 5
    while engine.num_live() and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.shutdown()
    state = engine.engine.state
    assert engine.num_live() == 0 and not state.requests
    assert state.pool.num_free == state.pool.num_blocks


def test_bad_input_raises_at_add_and_queues_nothing():
    engine = make_engine()

    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("x", list(range(1, 70)), params(4))
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request("y", [1, 500], params(4))
        return [o async for o in engine.generate([3], params(2), "x")]  # the id is free again

    assert run(main())[-1].finished
    engine.shutdown()


def test_idle_engine_thread_sleeps():
    engine = make_engine()

    async def main():
        [o async for o in engine.generate([3, 4], params(3), "a")]

    run(main())
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps == steps  # no busy loop: the thread waits on its condition
    thread = engine._thread
    assert thread is not None and thread.is_alive()
    engine.shutdown()
    assert not thread.is_alive()


class GatedExecutor(FakeExecutor):
    """Blocks every execute until the gate opens."""

    def __init__(self) -> None:
        super().__init__(64, 4, vocab_size=VOCAB)
        self.gate, self.busy = threading.Event(), threading.Event()

    def execute(self, plan):
        self.busy.set()
        self.gate.wait(10)
        return super().execute(plan)


def test_max_waiting_bounds_the_queue():
    ex = GatedExecutor()
    engine = make_engine(ex, max_waiting=2)

    async def main():
        first = await engine.add_request("a", [1, 2], params(2))
        while not ex.busy.is_set():  # the engine thread is inside step(): adds now queue up
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(engine.add_request(r, [1, 2], params(2))) for r in ("b", "c")]
        await asyncio.sleep(0.05)
        assert engine.num_waiting() == 2
        with pytest.raises(QueueFullError):
            await engine.add_request("d", [1, 2], params(2))
        ex.gate.set()
        for s in [first, *[await q for q in queued]]:
            assert [o async for o in s][-1].finished

    run(main())
    engine.shutdown()


class DyingExecutor(FakeExecutor):
    def __init__(self, after: int) -> None:
        super().__init__(64, 4, vocab_size=VOCAB)
        self.left = after

    def execute(self, plan):
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("device lost")
        return super().execute(plan)


def test_engine_death_ends_every_stream_with_an_error():
    # one failed step is death here (max_consecutive_failures=1); with the default 3,
    # a device failing on two requests first ends both with finish_reason "error"
    dead = []
    engine = make_engine(DyingExecutor(after=3), failures=1, on_dead=dead.append)

    async def consume(rid):
        got = []
        with pytest.raises(EngineDeadError):
            async for out in engine.generate([1, 2, 3], params(30), rid):
                got.append(out)
        return got

    async def main():
        return await asyncio.gather(consume("a"), consume("b"))

    run(main())
    engine._thread.join(10)  # the streams learn of the death before the thread calls on_dead and exits
    assert len(dead) == 1 and engine.errored and not engine.is_running

    async def late():
        with pytest.raises(EngineDeadError):
            await engine.add_request("c", [1], params(2))

    run(late())
