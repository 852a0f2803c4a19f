"""Logits processing before sampling, with vLLM's semantics and order:
``allowed_token_ids``, then bad words, then ``logit_bias``, then the
repetition, frequency and presence penalties.

Everything is read from the plan: the row's :class:`~fnllm.state.SamplingParams`
and, for penalties and bad words, its ``history`` (prompt ids, output ids
so far). Rows that ask for none of it are not touched (their logits are the
very same values), and every operation is elementwise per row, so a row's
processed logits do not depend on the rest of the batch: seeded sampling
stays batch-invariant. Counting a long output every step would cost
O(length) per row: :class:`CountMemo` (held by the executor) extends the
previous step's counts by the one new token instead.
"""

from __future__ import annotations

import torch

from fnllm.state import OutputIds, SamplingParams


def _count(tokens, vocab: int, device) -> torch.Tensor:
    ids = torch.tensor(tuple(tokens), dtype=torch.int64, device=device)
    return torch.bincount(ids, minlength=vocab).to(torch.float32)


class CountMemo:
    """Token counts derived from plan data only, memoized by the identity of
    the plan's immutable values: an output's cons cell (the counts of the
    cell before it plus its one token) and a prompt tuple. An entry lives
    one step past its last use; a miss recounts from the plan, so the counts
    never depend on the memo (they are exact small integers either way)."""

    def __init__(self) -> None:
        self._prev: dict = {}
        self._now: dict = {}

    def _get(self, key_obj, make) -> torch.Tensor:
        hit = self._now.get(id(key_obj)) or self._prev.get(id(key_obj))
        if hit is not None and hit[0] is key_obj:
            value = hit[1]
        else:
            value = make()
        self._now[id(key_obj)] = (key_obj, value)
        return value

    def output_counts(self, out, vocab: int, device) -> torch.Tensor:
        if not isinstance(out, OutputIds):
            return _count(out, vocab, device)
        cell = out.cell

        def make() -> torch.Tensor:
            before = None if cell is None else self._prev.get(id(cell[1]))
            if before is not None and before[0] is cell[1]:
                counts = before[1].clone()
                counts[cell[0]] += 1
                return counts
            return _count(out.tokens(), vocab, device)

        return self._get(cell, make)

    def prompt_counts(self, prompt: tuple, vocab: int, device) -> torch.Tensor:
        return self._get(prompt, lambda: _count(prompt, vocab, device))

    def end_step(self) -> None:
        self._prev, self._now = self._now, {}


def _counts(seqs, vocab: int, device, memo: CountMemo | None, prompt: bool) -> torch.Tensor:
    """Counts ``[len(seqs), vocab]`` of each row's token ids (float32)."""
    if memo is None:
        return torch.stack([_count(s, vocab, device) for s in seqs])
    get = memo.prompt_counts if prompt else memo.output_counts
    return torch.stack([get(s, vocab, device) for s in seqs])


def banned_by_words(words: tuple[tuple[int, ...], ...], output: tuple[int, ...]) -> list[int]:
    """The last token of each bad word whose other tokens end ``output``."""
    out = []
    for w in words:
        head = len(w) - 1
        if head > len(output):
            continue
        tail = output.last(head) if isinstance(output, OutputIds) else tuple(output[len(output) - head :])
        if head == 0 or tail == tuple(w[:head]):
            out.append(w[-1])
    return out


def process_rows(x: torch.Tensor, params: list[SamplingParams], history: list[tuple],
                 memo: CountMemo | None = None) -> torch.Tensor:
    """The processed logits of rows ``x`` (float32, a new tensor)."""
    x = x.to(torch.float32, copy=True)
    rows, vocab = x.shape
    dev = x.device
    for r, sp in enumerate(params):
        if sp.allowed_token_ids is not None:
            keep = torch.zeros(vocab, dtype=torch.bool, device=dev)
            keep[torch.tensor(sp.allowed_token_ids, dtype=torch.int64, device=dev)] = True
            x[r].masked_fill_(~keep, float("-inf"))
        if sp.bad_words_token_ids:
            banned = banned_by_words(sp.bad_words_token_ids, history[r][1] if history[r] else ())
            if banned:
                x[r, torch.tensor(banned, dtype=torch.int64, device=dev)] = float("-inf")
        if sp.logit_bias:
            ids = torch.tensor(list(sp.logit_bias.keys()), dtype=torch.int64, device=dev)
            x[r, ids] += torch.tensor(list(sp.logit_bias.values()), dtype=torch.float32, device=dev)
    counted = [r for r, sp in enumerate(params) if sp.needs_counts]
    if counted:
        idx = torch.tensor(counted, device=dev)
        y = x.index_select(0, idx)
        outputs = _counts([history[r][1] for r in counted], vocab, dev, memo, prompt=False)
        seen_out = outputs > 0
        rep = torch.tensor([params[r].repetition_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        freq = torch.tensor([params[r].frequency_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        pres = torch.tensor([params[r].presence_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        seen = seen_out | (_counts([history[r][0] for r in counted], vocab, dev, memo, prompt=True) > 0)
        rep = torch.where(seen, rep, torch.ones((), device=dev))
        y = torch.where(y > 0, y / rep, y * rep)
        y = y - freq * outputs - pres * seen_out.float()
        x.index_copy_(0, idx, y)
    return x


def apply_processing(logits: torch.Tensor, params: list[SamplingParams], history: list[tuple],
                     memo: CountMemo | None = None) -> torch.Tensor:
    """``logits`` (row ``i`` <-> ``params[i]``, ``history[i]``) with every row
    that asks for it processed; ``logits`` itself when no row does. The
    result is float32 whenever a row was processed (the others' values unchanged)."""
    rows = [i for i, sp in enumerate(params) if sp.processes_logits]
    if not rows:
        return logits
    out = logits.to(torch.float32, copy=True)
    idx = torch.tensor(rows, device=logits.device)
    done = process_rows(out.index_select(0, idx), [params[i] for i in rows], [history[i] for i in rows], memo)
    out.index_copy_(0, idx, done)
    return out
