"""The virtual clock and the simulation loop.

The loop is the serving shell: a real :class:`fnllm.engine.LLMEngine` (its
``add_request`` and ``step``, hence the same ``schedule`` and ``commit``)
with a :class:`~fnllm.sim.executor.SimExecutor` and a clock that reads
virtual time. Requests are added when virtual time reaches their arrival;
after each step ``now += cost.step_seconds(engine.last_plan)``; when nothing
is live, time jumps to the next arrival. Nothing here reads a real clock.

While the loop runs, the cyclic collector's youngest generation is collected
every 50,000 net allocations instead of CPython's 700 (the process's
thresholds are restored after): what a step makes dies by reference
counting (a 100,000-request run leaves ~50 objects in cycles), and at 700
the collector rescans the live requests' young objects every few dozen
steps (~3 % of the loop's time). It changes no result.

Measured per request: arrival, the end of the step that produced its first
token, and its finish; per step: time, KV blocks in use, running and
waiting counts (for plots), and preemptions (the core's counter: a running
sequence sent back to the waiting queue, by recompute or swap).
"""

from __future__ import annotations

import contextlib
import functools
import gc
from typing import Callable

import attrs

from fnllm.config import EngineConfig
from fnllm.engine import LLMEngine
from fnllm.sim.cost import CostModel
from fnllm.sim.executor import SimExecutor, filler_token
from fnllm.sim.workload import WorkItem, prompt_ids
from fnllm.state import RequestOutputKind, SamplingParams


class VirtualClock:
    """A clock the loop moves: ``clock()`` reads ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@attrs.define
class SimResult:
    config: EngineConfig
    arrival: dict  # request id -> seconds
    first_token: dict  # request id -> end of the step that produced its first token
    finish: dict  # request id -> end of the step that finished it
    output_len: dict  # request id -> tokens generated (all samples)
    steps: int = 0
    preemptions: int = 0
    rejected: dict = attrs.field(factory=dict)  # request id -> reason
    # per step (possibly thinned to at most `series_points`): time, blocks in use, running, waiting
    series: list = attrs.field(factory=list)
    peak_kv_blocks: int = 0
    plans: list | None = None  # every plan, when asked for (tests)
    add_steps: dict = attrs.field(factory=dict)  # request id -> engine step at which it was added


def _request_params(item: WorkItem) -> SamplingParams:
    return _params_for(item.output_len)


@functools.lru_cache(maxsize=4096)
def _params_for(output_len: int) -> SamplingParams:
    """One (immutable) params value per output length, shared by the requests that ask for it."""
    return SamplingParams(
        max_tokens=output_len, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY
    )


class _EngineShell:
    """The serving shell itself: LLMEngine.add_request / step."""

    def __init__(self, config, executor, clock) -> None:
        self.engine = LLMEngine(config, executor, None, clock=clock)

    @property
    def state(self):
        return self.engine.state

    def add(self, rid: str, ids: tuple[int, ...], params: SamplingParams) -> str | None:
        try:
            self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
        except ValueError as e:
            return str(e)
        return None

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self, res: "SimResult", now_after: Callable[[object], float]):
        outs = self.engine.step()
        plan = self.engine.last_plan
        now = now_after(plan)
        first = res.first_token
        if 0 in plan.output_pos:  # only a row with no output before this step can see its first token
            for rid in self.engine.last_news.request_ids:
                if rid not in first:
                    first[rid] = now
        for out in outs:  # requests run FINAL_ONLY: an output is a finished request
            rid = out.request_id
            if out.finished:
                res.finish[rid] = now
                res.output_len[rid] = sum(len(c.token_ids) for c in out.outputs)
        return plan


def _add_arrived(sh: _EngineShell, res: SimResult, work: list, k: int, now: float, vocab: int,
                 avoid: frozenset) -> int:
    """Add ``work[k:]``'s items that have arrived by ``now`` (rejections
    recorded); the index of the first item still to come."""
    while k < len(work) and work[k].arrival <= now:
        item = work[k]
        why = sh.add(item.request_id, prompt_ids(item, k, vocab, avoid), _request_params(item))
        if why is None:
            res.arrival[item.request_id] = item.arrival
            res.add_steps[item.request_id] = sh.state.step
        else:
            res.rejected[item.request_id] = why
        k += 1
    return k


def _record(res: SimResult, state, now: float, num_blocks: int, thin: int, series_points: int) -> int:
    """Peak KV use, and every ``thin``-th step's point of the series (halved
    when it reaches ``2 * series_points``); the thinning factor after."""
    used = num_blocks - state.pool.num_free
    if used > res.peak_kv_blocks:
        res.peak_kv_blocks = used
    if res.steps % thin == 0:
        res.series.append((now, used, len(state.running), len(state.waiting)))
        if len(res.series) >= 2 * series_points:
            res.series = res.series[::2]
            thin *= 2
    return thin


@contextlib.contextmanager
def _young_collections_every(allocations: int):
    """Collect generation 0 every ``allocations`` net allocations inside the block."""
    old = gc.get_threshold()
    if old[0]:  # 0: automatic collection is off, and stays off
        gc.set_threshold(max(old[0], allocations), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def simulate(
    workload: tuple[WorkItem, ...] | list[WorkItem],
    config: EngineConfig,
    cost: CostModel,
    *,
    executor=None,
    keep_plans: bool = False,
    series_points: int = 20_000,
) -> SimResult:
    """Run ``workload`` on a virtual clock; see the module docstring.

    ``executor`` replaces the SimExecutor (tests drive the fake
    device this way). Requests the engine rejects (too long for
    ``max_model_len`` or the pool) are listed in ``rejected`` and the rest
    run on, as in serving."""
    work = sorted(workload, key=lambda it: it.arrival)
    vocab, eos = config.model.vocab_size, config.model.eos_token_ids
    clock = VirtualClock(work[0].arrival if work else 0.0)
    ex = executor if executor is not None else SimExecutor(filler_token(vocab, eos))
    sh = _EngineShell(config, ex, clock)
    res = SimResult(config=config, arrival={}, first_token={}, finish={}, output_len={}, plans=[] if keep_plans else None)
    avoid = frozenset(eos)
    num_blocks, k, n = config.cache.num_blocks, 0, len(work)
    thin = 1

    def advance(plan) -> float:
        clock.now += cost.step_seconds(plan)
        return clock.now

    with _young_collections_every(50_000):
        while k < n or sh.busy():
            k = _add_arrived(sh, res, work, k, clock.now, vocab, avoid)
            if not sh.busy():
                if k < n:
                    clock.now = max(clock.now, work[k].arrival)
                continue
            t0 = clock.now
            plan = sh.step(res, advance)
            if not len(plan) and clock.now == t0:
                if k >= n:
                    raise RuntimeError(f"the engine made no progress at step {plan.step} with nothing left to arrive: "
                                       f"{plan.idle_reason or 'no reason given'}")
                clock.now = max(clock.now, work[k].arrival)  # nothing schedulable until more arrives
            res.steps += 1
            if keep_plans:
                res.plans.append(plan)
            thin = _record(res, sh.state, clock.now, num_blocks, thin, series_points)
    res.preemptions = sh.state.num_preemptions
    return res
