"""State machine over the public ``LLMEngine`` API with injected device faults.

Rules add valid and invalid requests, abort known, unknown and repeated ids,
step, and inject faults: a poison request (every plan holding it fails,
before or after the device wrote its KV), a one-off transient failure, and a
dead device. After every rule the core invariants hold and no request has
produced output after it ended. At teardown, unless the device was killed,
the engine drains; every accepted request has ended exactly once; poison
requests end with ``finish_reason="error"`` (or earlier, by abort or
normally); every other request that ran to its end has exactly the tokens of
a solo run on a healthy device; and every block is free. A killed device
makes ``step`` raise ``EngineDeadError`` within ``max_consecutive_failures``
steps, and aborting what is left frees every block. A healthy device can
only be declared dead after K consecutive plans made of poison requests
alone, so that needs at least K poison requests.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fnllm.device.fake import FakeExecutor, KVReadError
from fnllm.engine import LLMEngine
from fnllm.errors import EngineDeadError
from fnllm.invariants import check_invariants
from fnllm.state import SamplingParams
from tests.property.invariants import snapshot
from tests.property.strategies import EOS, VOCAB, engine_configs, prompts, sampling_params

K = 3  # max_consecutive_failures


class FaultyExecutor:
    """A fake device with injectable faults; a KV read of unwritten slots (a
    bug in fnllm, not a device fault) is remembered so the test fails on it."""

    def __init__(self, inner: FakeExecutor) -> None:
        self.inner = inner
        self.poison: dict[str, bool] = {}  # request -> fail after writing KV
        self.transient = 0
        self.dead = False
        self.bug: str | None = None

    def execute(self, plan):
        if self.dead:
            raise RuntimeError("device lost")
        if self.transient:
            self.transient -= 1
            raise RuntimeError("transient device error")
        hit = [r for r in plan.request_ids if r in self.poison]
        if hit and not self.poison[hit[0]]:
            raise RuntimeError(f"poison request {hit[0]}")
        try:
            out = self.inner.execute(plan)
        except KVReadError as e:
            self.bug = str(e)
            raise
        if hit:
            raise RuntimeError(f"poison request {hit[0]} (after its KV was written)")
        return out


def solo_tokens(config, eos_every: int, prompt, sp) -> list[list[int]]:
    """The request's tokens, run alone on a healthy device."""
    engine = LLMEngine(config, FakeExecutor(config.cache.num_blocks, config.cache.block_size, VOCAB, EOS, eos_every,
                        sliding_window=config.cache.sliding_window))
    engine.add_request("solo", list(prompt), sp)
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o if o.finished else final
    return [c.token_ids for c in final.outputs]


class EngineMachine(RuleBasedStateMachine):
    @initialize(config=engine_configs(), eos_every=st.sampled_from((0, 0, 5, 9)))
    def setup(self, config, eos_every):
        self.config, self.eos_every = config, eos_every
        fake = FakeExecutor(config.cache.num_blocks, config.cache.block_size, VOCAB, EOS, eos_every,
                        sliding_window=config.cache.sliding_window)
        self.ex = FaultyExecutor(fake)
        self.engine = LLMEngine(config, self.ex, clock=lambda: 0.0, max_consecutive_failures=K)
        self.added: dict[str, tuple] = {}
        self.finals: dict = {}
        self.aborted: set[str] = set()
        self.n = 0
        self.failed_steps = 0

    def _collect(self, outs) -> None:
        for o in outs:
            assert o.request_id not in self.finals, f"{o.request_id} produced output after it ended"
            if o.finished:
                self.finals[o.request_id] = o

    def _live(self) -> list[str]:
        return [r for r in self.added if r not in self.finals]

    @rule(prompt=prompts(), sp=sampling_params(), priority=st.integers(0, 3))
    def add(self, prompt, sp, priority):
        rid = f"r{self.n}"
        self.n += 1
        try:
            self.engine.add_request(rid, list(prompt), sp, priority=priority)
        except EngineDeadError:
            assert self.ex.dead or len(self.ex.poison) >= K, "the engine died on a healthy device"
            return
        except ValueError as e:
            assert "rejected" in str(e)  # a request that can never fit this config
            return
        self.added[rid] = (prompt, sp)

    @rule(kind=st.sampled_from(("empty", "vocab", "float", "duplicate", "logprobs", "params")))
    def add_invalid(self, kind):
        if self.engine.dead is not None:
            return
        live = self._live()
        rid, prompt, sp = f"bad{self.n}", [1, 2, 3], SamplingParams(max_tokens=2)
        if kind == "empty":
            prompt = []
        elif kind == "vocab":
            prompt = [1, VOCAB + 5]
        elif kind == "float":
            prompt = [1, 2.5]
        elif kind == "duplicate":
            if not live or live[0] not in self.engine._tracks:
                return
            rid = live[0]
        elif kind == "logprobs":
            sp = SamplingParams(max_tokens=2, logprobs=self.config.model.max_logprobs + 1)
        elif kind == "params":
            sp = {"temperature": -1}
        before = snapshot(self.engine.state)
        with pytest.raises(ValueError):
            self.engine.add_request(rid, prompt, sp)
        assert snapshot(self.engine.state) == before

    @rule(k=st.integers(0, 30), twice=st.booleans())
    def abort(self, k, twice):
        ids = list(self.added) or ["nobody"]
        rid = ids[k % len(ids)]
        if rid in self._live():
            self.aborted.add(rid)
        self.engine.abort_request([rid, rid] if twice else rid)
        if twice:
            self.engine.abort_request(rid)

    @rule()
    def abort_unknown(self):
        before = snapshot(self.engine.state)
        self.engine.abort_request("never-added")
        assert snapshot(self.engine.state) == before

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self._step()

    def _step(self) -> None:
        if self.engine.dead is not None:
            with pytest.raises(EngineDeadError):
                self.engine.step()
            return
        try:
            self._collect(self.engine.step())
        except EngineDeadError:
            assert self.ex.dead or len(self.ex.poison) >= K, "the engine died on a healthy device"

    @rule(k=st.integers(0, 30), after_write=st.booleans())
    def poison(self, k, after_write):
        live = self._live()
        if live:
            self.ex.poison[live[k % len(live)]] = after_write

    @rule()
    def transient_fault(self):
        self.ex.transient = 1

    @precondition(lambda self: self.n >= 3)
    @rule()
    def kill_device(self):
        self.ex.dead = True

    @invariant()
    def consistent(self):
        if hasattr(self, "engine"):
            assert self.ex.bug is None, self.ex.bug
            check_invariants(self.engine.state, self.config)

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        if self.ex.dead or self.engine.dead is not None:
            self._teardown_dead()
            return
        for _ in range(20 * sum(len(p) + sp.max_tokens * sp.n for p, sp in self.added.values()) + 50):
            if not self.engine.has_unfinished_requests():
                break
            self._step()
            if self.engine.dead is not None:  # K plans of poison requests alone (checked in _step)
                self._teardown_dead()
                return
        assert not self.engine.has_unfinished_requests(), "the engine did not drain"
        assert set(self.finals) == set(self.added), "a request never ended"
        for rid, out in self.finals.items():
            self._check_final(rid, out)
        pool = self.engine.state.pool
        assert pool.num_free == pool.num_blocks and not self.engine.state.requests

    def _check_final(self, rid: str, out) -> None:
        reasons = {c.finish_reason for c in out.outputs}
        if "error" in reasons:
            assert rid in self.ex.poison and out.error, f"{rid} ended in error but was not poison"
            return
        if reasons & {"abort"}:
            assert rid in self.aborted
            return
        prompt, sp = self.added[rid]
        assert [c.token_ids for c in out.outputs] == solo_tokens(self.config, self.eos_every, prompt, sp)

    def _teardown_dead(self) -> None:
        for _ in range(K):  # each step with live requests on a dead device is a failure
            if not self.engine.state.requests or self.engine.dead is not None:
                break
            try:
                self._collect(self.engine.step())
            except EngineDeadError:
                break
        if self.engine.state.requests:
            assert self.engine.dead is not None, f"no EngineDeadError after {K} steps on a dead device"
        self.engine.abort_request(list(self.engine.state.requests.keys()))
        pool = self.engine.state.pool
        assert pool.num_free == pool.num_blocks


TestEngineMachine = EngineMachine.TestCase
