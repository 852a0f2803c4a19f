"""The device's half of guided decoding: grammar matchers and the token bitmask.

:class:`GuidedRows` keeps one xgrammar matcher per sequence id, together with
the output tokens it has accepted (the plan's shared cons cell at that
length). Everything follows from the plan: row ``i`` of a plan carries its
sequence's output so far (``plan.guided_outputs[i]``); when the cached
matcher's accepted tokens are a prefix of it, the matcher accepts the rest,
otherwise (preemption with a different history, a fork's new child, a
replay, a retried step) it is rebuilt from the plan's tokens. So the mask a
row gets is a function of (its guided params, its output tokens) only.

A grammar that has accepted a stop token (EOS) allows only stop tokens
afterwards (the request ends there unless ``ignore_eos``). The cache is an
optimisation: entries of sequences absent from recent plans are dropped.
"""

from __future__ import annotations

import sys

import torch

from fnllm.state import BatchPlan, OutputIds

MAX_IDLE_STEPS = 64  # a matcher unused this many steps is dropped (rebuilt if its sequence returns)


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # [byte value, bit] -> allowed
_ADDENDS: dict = {}


def apply_bitmask_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """``logits[r]`` of each of ``rows`` gets -inf where bit ``t`` of ``bitmask[r]``
    (xgrammar's int32 layout: token ``t`` is bit ``t % 32`` of word ``t // 32``)
    is 0, in place. Each mask byte indexes a table of 8 addends (0 or -inf),
    so the work is a few vectorised passes (xgrammar's CPU kernel tests the
    bits one by one); the result is bit-identical to its."""
    table = _ADDENDS.get(logits.dtype)
    if table is None:
        table = _ADDENDS[logits.dtype] = torch.zeros(256, 8, dtype=logits.dtype).masked_fill_(~_BYTE_BITS, float("-inf"))
    idx = torch.tensor(rows, dtype=torch.long)
    data = bitmask.index_select(0, idx).contiguous().view(torch.uint8).to(torch.long).view(-1)  # little-endian bytes
    addend = table.index_select(0, data).view(len(rows), -1)[:, : logits.shape[-1]]
    logits.index_add_(0, idx, addend)


class _Entry:
    __slots__ = ("params", "matcher", "cell", "n", "last_step")

    def __init__(self, params, matcher) -> None:
        self.params, self.matcher, self.cell, self.n, self.last_step = params, matcher, None, 0, 0


def _same(a, b) -> bool:
    """Two cons lists of equal length hold the same tokens (stops where they share a tail)."""
    while a is not b:
        if a is None or b is None or a[0] != b[0]:
            return False
        a, b = a[1], b[1]
    return True


class GuidedRows:
    """Bitmasks for a plan's guided rows; ``compiler`` is a :class:`fnllm.guided.GuidedCompiler`."""

    def __init__(self, compiler) -> None:
        self.compiler = compiler
        self.xgr = compiler.xgr
        self.stop_ids = torch.tensor(compiler.stop_token_ids, dtype=torch.long)
        self._entries: dict[int, _Entry] = {}
        self._bitmask = None
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on first use
        self._step = 0

    def apply(self, plan: BatchPlan, rows: list[int], logits: torch.Tensor) -> None:
        """Mask, in place, the logits of ``rows`` (plan row ids, in logits-row order) that are guided."""
        self._step += 1
        targets, terminated = [], []
        for k, i in enumerate(rows):
            out = plan.guided_outputs[i] if plan.guided_outputs else None
            params = plan.sampling[i].guided_decoding
            if params is None or out is None:
                continue
            entry = self._sync(plan.seq_ids[i], params, out)
            if entry.matcher.is_terminated():
                terminated.append(k)
            else:
                targets.append((k, entry))
        if targets:  # bitmask row k belongs to logits row k
            bitmask = self._mask_buffer(logits.shape[0])
            if len(targets) == 1:
                targets[0][1].matcher.fill_next_token_bitmask(bitmask, targets[0][0])
            else:  # xgrammar fills the rows' masks on several threads
                if self._batch is None:
                    self._batch = self.xgr.BatchGrammarMatcher()
                self._batch.batch_fill_next_token_bitmask([e.matcher for _, e in targets], bitmask,
                                                          indices=[k for k, _ in targets])
            rows_k = [k for k, _ in targets]
            if logits.device.type == "cpu" and sys.byteorder == "little":  # the table reads the words' bytes
                apply_bitmask_cpu(logits, bitmask, rows_k)
            else:
                self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1],
                                                     indices=rows_k)
        for k in terminated if len(self.stop_ids) else ():  # the grammar is complete: only a stop token may follow
            keep = logits[k, self.stop_ids].clone()
            logits[k].fill_(float("-inf"))
            logits[k, self.stop_ids] = keep
        self._evict()

    def _mask_buffer(self, n: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = self.xgr.allocate_token_bitmask(max(n, 8), self.compiler.vocab_size)
        return self._bitmask

    def _sync(self, seq_id: int, params, out: OutputIds) -> _Entry:
        """The sequence's matcher, having accepted exactly ``out``'s tokens."""
        entry = self._entries.get(seq_id)
        if entry is not None and (entry.params is params or entry.params == params) and entry.n <= out.n:
            cell, new = out.cell, []
            for _ in range(out.n - entry.n):
                new.append(cell[0])
                cell = cell[1]
            if _same(cell, entry.cell):
                self._accept(entry, reversed(new))
                entry.cell, entry.n, entry.last_step = out.cell, out.n, self._step
                return entry
        entry = _Entry(params, self.compiler.matcher(params))
        self._entries[seq_id] = entry
        self._accept(entry, out.tokens())  # a token the grammar refuses (only via ignore_eos) is skipped
        entry.cell, entry.n, entry.last_step = out.cell, out.n, self._step
        return entry

    @staticmethod
    def _accept(entry: _Entry, tokens) -> None:
        m = entry.matcher
        for t in tokens:
            if m.is_terminated():
                continue  # after EOS (ignore_eos / min_tokens): the grammar stays complete
            m.accept_token(int(t))  # refuses (no change) only a token sampled without a mask

    def _evict(self) -> None:
        if len(self._entries) > 16 and self._step % 16 == 0:
            old = [s for s, e in self._entries.items() if self._step - e.last_step > MAX_IDLE_STEPS]
            for s in old:
                del self._entries[s]

    def __len__(self) -> int:
        return len(self._entries)
