"""``SimExecutor``: the Executor protocol without a model.

Every sampled token is one fixed id that is not an end-of-sequence id; the
simulator gives each request ``max_tokens = output_len`` with ``ignore_eos``,
so a request ends at exactly its recorded output length, deterministically,
through the core's own length check. Keeps no state.
"""

from __future__ import annotations

from fnllm.state import BatchPlan, StepOutput


def filler_token(vocab_size: int, eos_token_ids=()) -> int:
    """The smallest id >= 3 (0..2 are usually special) that is not an EOS id."""
    eos = set(eos_token_ids)
    t = 3 if vocab_size > 3 else 0
    while t in eos:
        t += 1
    if t >= vocab_size:
        raise ValueError("the vocabulary has no non-EOS token")
    return t


class SimExecutor:
    """``execute(plan)``: ``num_samples[i]`` copies of the filler token per row."""

    def __init__(self, token: int) -> None:
        self.token = token
        self._rows = {n: (token,) * n for n in range(0, 9)}
        self.steps = 0

    def execute(self, plan: BatchPlan) -> StepOutput:
        rows = self._rows
        self.steps += 1
        counts = plan.num_samples
        if plan.num_draft_tokens:  # speculative rows: one token per position (every draft rejected)
            counts = tuple(n + d for n, d in zip(counts, plan.num_draft_tokens))
        if counts.count(1) == len(counts):  # the common step: one token per row
            return StepOutput(sampled=(rows[1],) * len(counts))
        return StepOutput(sampled=tuple(rows[n] if n in rows else (self.token,) * n for n in counts))
