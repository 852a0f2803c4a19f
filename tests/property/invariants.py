"""Test-side invariant helpers: deep snapshots for purity checks, and a
driver that runs a workload through schedule -> fake execute -> commit,
checking every invariant after every transition."""

from __future__ import annotations

from fnllm.config import EngineConfig
from fnllm.device.fake import FakeExecutor
from fnllm.invariants import check_invariants, check_plan
from fnllm.lifecycle import add_request, initial_state
from fnllm.schedule import schedule
from fnllm.state import BlockPool, EngineState, Rejection, Request, StepOutput
from fnllm.step import commit
from tests.property.strategies import EOS


def snapshot_pool(pool: BlockPool | None) -> tuple | None:
    """A deep, plain-Python copy of a pool (and its host tier): equal iff the pool is unchanged."""
    if pool is None:
        return None
    return (
        pool.num_blocks,
        pool.block_size,
        tuple(sorted(pool.ref.items())),
        pool.free_stack,
        pool.num_stack,
        pool.fresh,
        pool.lru_head,
        pool.lru_tail,
        tuple(sorted(pool.lru_next.items())),
        tuple(sorted(pool.lru_prev.items())),
        pool.num_lru,
        tuple(sorted(pool.hash_of.items())),
        tuple(sorted(pool.content.items(), key=lambda kv: kv[0])),
        snapshot_pool(pool.host),
    )


def snapshot(state: EngineState) -> tuple:
    return (
        snapshot_pool(state.pool),
        tuple(sorted(state.requests.items())),
        tuple(sorted(state.alive.items())),
        state.waiting,
        state.running,
        state.next_seq_id,
        state.next_arrival,
        state.step,
        (state.num_preemptions, state.prefix_cache_queries, state.prefix_cache_hits),
    )


class Run:
    """A workload under one config, checked at every transition."""

    def __init__(self, config: EngineConfig, *, eos_every: int = 0) -> None:
        self.config = config
        self.state = initial_state(config)
        self.ex = FakeExecutor(
            config.cache.num_blocks, config.cache.block_size, config.model.vocab_size, EOS, eos_every,
            sliding_window=config.cache.sliding_window,
        )
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.finish: dict[tuple[str, int], str] = {}
        self.done: set[str] = set()
        self.rejected: dict[str, str] = {}
        self.plans = []
        self.preemptions = 0
        self.swaps = 0  # sequences swapped out

    def add(self, request: Request) -> bool:
        out = add_request(self.state, request, self.config)
        if isinstance(out, Rejection):
            self.rejected[request.request_id] = out.reason
            return False
        self.state = out
        check_invariants(self.state, self.config)
        return True

    def step(self) -> None:
        before = self.state
        after, plan = schedule(before, self.config)
        check_plan(before, after, plan, self.config)
        check_invariants(after, self.config)
        was_running = set(before.running.seq_ids)
        self.preemptions += sum(1 for s in after.waiting if s.seq_id in was_running)
        self.swaps += sum(1 for s in after.waiting if s.seq_id in was_running and s.swapped)
        out = self.ex.execute(plan) if plan.has_device_work else StepOutput()
        self.state, outs = commit(after, plan, out, self.config)
        check_invariants(self.state, self.config)
        self.plans.append(plan)
        for o in outs:
            self.tokens.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
            if o.finish_reason:
                self.finish[(o.request_id, o.index)] = o.finish_reason
            if o.request_finished:
                self.done.add(o.request_id)

    def drain(self, max_steps: int) -> int:
        """Step until no request is live; the steps taken (fails past ``max_steps``)."""
        n = 0
        while self.state.requests:
            assert n < max_steps, f"not drained after {max_steps} steps: livelock? {self.plans[-1].idle_reason}"
            self.step()
            n += 1
        pool = self.state.pool
        assert pool.num_free == pool.num_blocks, "invariant 6: blocks held after every request finished"
        assert pool.host.num_free == pool.host.num_blocks, "invariant 6: host blocks held after every request finished"
        return n


def step_bound(requests: list[Request], config: EngineConfig) -> int:
    """A generous bound on steps to drain (a livelock exceeds any bound)."""
    total = sum((len(r.prompt_token_ids) + r.sampling.max_tokens) * r.sampling.n for r in requests)
    return 20 * total + 50
