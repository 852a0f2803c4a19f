"""A deterministic stand-in device: no model, but a real paged "KV cache".

``FakeExecutor`` keeps, per block, the token id written at each slot, the way
a real executor keeps K/V. A row's context is read back through its block
table, so a wrong table, a missed copy-on-write or a stale block gives a
different context and a different token, exactly as it would on a device.
The next token is a fixed function of the whole context (and, for sampled
rows, of seed, sample index and output position), so with this executor
tokens depend only on the sequence's prefix: any difference across block
sizes, budgets or preemption is a scheduler bug. Host blocks (the swap
tier) are emulated too: ``swap_out`` copies a device block to a host block,
``swap_in`` copies it back (in that order, before copies and the forward),
so a missed, misdirected or reordered swap reads other tokens or unwritten
KV. With ``sliding_window`` W, a row reads only the positions its queries
attend to (from ``position - W + 1`` on), the next token is a function of
the last W tokens, and a hole (:data:`~fnllm.state.HOLE`) or unwritten slot
in that range is a :class:`KVReadError`. Imports no torch.
KV. A row with draft tokens (speculative decoding) is sampled at each of
its last ``1 + num_draft_tokens`` positions, from the context up to that
position, with output position ``output_pos + j``. Imports no torch.
"""

from __future__ import annotations

import hashlib
from array import array

from fnllm.state import HOLE, BatchPlan, StepOutput


class KVReadError(AssertionError):
    """The plan made a row read KV that was never written."""


def fake_next_token(context: tuple[int, ...], vocab_size: int, salt: tuple = ()) -> int:
    h = hashlib.blake2b(array("q", context).tobytes() + repr(salt).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") % vocab_size


class FakeExecutor:
    """``execute(plan) -> StepOutput`` over an emulated paged KV cache.

    ``eos_every``: a context whose length is a multiple of it yields
    ``eos_token_id`` (when both are set), so stop handling gets exercised.
    ``cycle``: when > 0, the next token depends on the last ``cycle``
    tokens only (the whole context is still read and checked), so greedy
    outputs fall into cycles that n-gram speculation predicts.
    """

    def __init__(
        self, num_blocks: int, block_size: int, vocab_size: int = 97, eos_token_id: int | None = None, eos_every: int = 0,
        sliding_window: int | None = None,
        cycle: int = 0,
    ) -> None:
        self.cycle = cycle
        self.block_size = block_size
        self.window = sliding_window
        self.vocab_size = vocab_size
        self.eos_token_id, self.eos_every = eos_token_id, eos_every
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.host: dict[int, list[int | None]] = {}
        self.steps = 0
        self.swapped_out = self.swapped_in = 0

    def _token(self, context: tuple[int, ...], sp, index: int, out_pos: int) -> int:
        if self.eos_token_id is not None and self.eos_every and len(context) % self.eos_every == 0:
            return self.eos_token_id
        salt = () if sp.temperature == 0 else (sp.seed, index, out_pos)
        return fake_next_token(context[-self.cycle :] if self.cycle else context, self.vocab_size, salt)

    def _visible(self, context: tuple[int, ...]) -> tuple[int, ...]:
        """The last ``sliding_window`` tokens of a query's context (all without a window)."""
        return context[max(0, len(context) - self.window) :] if self.window else context

    def execute(self, plan: BatchPlan) -> StepOutput:
        bs, kv, host = self.block_size, self.kv, self.host
        for dev, h in plan.swap_out:
            host[h] = list(kv[dev])
        for h, dev in plan.swap_in:
            kv[dev] = list(host.get(h) or [None] * bs)
        self.swapped_out += len(plan.swap_out)
        self.swapped_in += len(plan.swap_in)
        for src, dst in plan.copies:
            kv[dst] = list(kv[src])
        # write every row's KV first, then read, like a real layer does
        for r, (toks, pos, table) in enumerate(zip(plan.token_ids, plan.positions, plan.block_tables)):
            for k, t in enumerate(toks):
                p = pos + k
                if table[p // bs] == HOLE:
                    raise KVReadError(f"plan row {r} (seq {plan.seq_ids[r]}) writes position {p} into a hole")
                kv[table[p // bs]][p % bs] = t
        sampled = []
        drafts = plan.num_draft_tokens or (0,) * len(plan)
        for r, (toks, pos, table, n) in enumerate(zip(plan.token_ids, plan.positions, plan.block_tables, plan.num_samples)):
            end = pos + len(toks)
            if n == 0 and not self.window:
                sampled.append(())
                continue
            lo = max(0, pos - self.window + 1) if self.window else 0  # what the row's queries read
            context = self._read(r, plan, table, lo, end)
            if n == 0:
                sampled.append(())
                continue
            sp, idx, opos, d = plan.sampling[r], plan.sample_index[r], plan.output_pos[r], drafts[r]
            if d:  # speculative row: one sample at each of its last d + 1 positions
                sampled.append(tuple(
                    self._token(self._visible(context[: end - d + j - lo]), sp, idx, opos + j) for j in range(d + 1)
                ))
                continue
            context = self._visible(context)
            sampled.append(tuple(self._token(context, sp, idx + j, opos) for j in range(n)))
        self.steps += 1
        return StepOutput(sampled=tuple(sampled))

    def _read(self, r: int, plan: BatchPlan, table, lo: int, end: int) -> tuple:
        bs, kv = self.block_size, self.kv
        if any(table[j] == HOLE for j in range(lo // bs, -(-end // bs))):
            raise KVReadError(f"plan row {r} (seq {plan.seq_ids[r]}) reads a hole in positions {lo}..{end - 1}")
        context = tuple(kv[table[p // bs]][p % bs] for p in range(lo, end))
        if None in context:
            raise KVReadError(f"plan row {r} (seq {plan.seq_ids[r]}) reads unwritten KV at {lo + context.index(None)}")
        return context
