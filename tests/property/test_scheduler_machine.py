"""State machine over add / abort / step / drain with random configs: every
invariant after every rule, liveness on drain, and aborts that free all."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fnllm.invariants import check_invariants
from fnllm.lifecycle import abort_request
from fnllm.state import Request
from tests.property.invariants import Run, snapshot, step_bound
from tests.property.strategies import engine_configs, prompts, sampling_params


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(config=engine_configs(), eos_every=st.sampled_from((0, 0, 5, 9)))
    def setup(self, config, eos_every):
        self.run = Run(config, eos_every=eos_every)
        self.added: list[Request] = []
        self.aborted: dict[str, tuple[int, int]] = {}
        self.n = 0

    @rule(prompt=prompts(), sp=sampling_params(), priority=st.integers(0, 3))
    def add(self, prompt, sp, priority):
        req = Request(request_id=f"r{self.n}", prompt_token_ids=prompt, sampling=sp, priority=priority)
        self.n += 1
        if self.run.add(req):
            self.added.append(req)

    @rule()
    def add_duplicate(self):
        live = list(self.run.state.requests.keys())
        if live:
            before = snapshot(self.run.state)
            assert not self.run.add(Request(request_id=live[0], prompt_token_ids=(1, 2)))
            assert snapshot(self.run.state) == before

    @rule(k=st.integers(0, 50))
    def abort(self, k):
        ids = sorted(self.run.state.requests.keys()) + ["unknown-id"]
        rid = ids[k % len(ids)]
        before = self.run.state
        self.run.state = abort_request(before, rid)
        if rid == "unknown-id":
            assert self.run.state is before
        else:
            got = sum(len(v) for (r, _), v in self.run.tokens.items() if r == rid)
            self.aborted[rid] = (len(self.run.plans), got)
            assert rid not in self.run.state.requests
            held = [t for r, t in zip(self.run.state.running.request_ids, self.run.state.running.tables) if r == rid]
            assert not held, "invariant 15: aborted request still holds blocks"
        check_invariants(self.run.state, self.run.config)

    @rule()
    def step(self):
        self.run.step()

    @precondition(lambda self: len(self.added) > 0)
    @rule()
    def drain(self):
        self.run.drain(step_bound(self.added, self.run.config))
        for req in self.added:
            rid = req.request_id
            assert rid in self.run.done or rid in self.aborted, f"invariant 11: {rid} never finished"
        self.added = []

    @invariant()
    def aborted_produce_nothing(self):
        """Invariant 15: after its abort a request is in no plan and gets no token."""
        if not hasattr(self, "run"):
            return
        for rid, (n_plans, n_tokens) in self.aborted.items():
            assert all(rid not in p.request_ids for p in self.run.plans[n_plans:])
            got = sum(len(v) for (r, _), v in self.run.tokens.items() if r == rid)
            assert got == n_tokens


TestScheduler = SchedulerMachine.TestCase
