"""Logits processing before sampling, with vLLM's semantics and order:
``allowed_token_ids``, then bad words, then ``logit_bias``, then the
repetition, frequency and presence penalties.

Everything is read from the plan: the row's :class:`~fnllm.state.SamplingParams`
and, for penalties and bad words, its ``history`` (prompt ids, output ids
so far). Rows that ask for none of it are not touched (their logits are the
very same values), and every operation is elementwise per row, so a row's
processed logits do not depend on the rest of the batch: seeded sampling
stays batch-invariant.
"""

from __future__ import annotations

import torch

from fnllm.state import SamplingParams


def _bins(seqs: list[tuple[int, ...]], vocab: int, device) -> torch.Tensor:
    """Counts ``[len(seqs), vocab]`` of each row's token ids (float32)."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)
    if width:
        ids = torch.full((len(seqs), width), vocab, dtype=torch.int64)  # padding lands in the extra bin
        for r, s in enumerate(seqs):
            if s:
                ids[r, : len(s)] = torch.tensor(s, dtype=torch.int64)
        counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def banned_by_words(words: tuple[tuple[int, ...], ...], output: tuple[int, ...]) -> list[int]:
    """The last token of each bad word whose other tokens end ``output``."""
    out = []
    for w in words:
        head = len(w) - 1
        if head > len(output):
            continue
        if head == 0 or tuple(output[len(output) - head :]) == tuple(w[:head]):
            out.append(w[-1])
    return out


def process_rows(x: torch.Tensor, params: list[SamplingParams], history: list[tuple]) -> torch.Tensor:
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
        outputs = _bins([history[r][1] for r in counted], vocab, dev)
        seen_out = outputs > 0
        rep = torch.tensor([params[r].repetition_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        freq = torch.tensor([params[r].frequency_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        pres = torch.tensor([params[r].presence_penalty for r in counted], dtype=torch.float32, device=dev)[:, None]
        seen = seen_out | (_bins([history[r][0] for r in counted], vocab, dev) > 0)
        rep = torch.where(seen, rep, torch.ones((), device=dev))
        y = torch.where(y > 0, y / rep, y * rep)
        y = y - freq * outputs - pres * seen_out.float()
        x.index_copy_(0, idx, y)
    return x


def apply_processing(logits: torch.Tensor, params: list[SamplingParams], history: list[tuple]) -> torch.Tensor:
    """``logits`` (row ``i`` <-> ``params[i]``, ``history[i]``) with every row
    that asks for it processed; ``logits`` itself when no row does. The
    result is float32 whenever a row was processed (the others' values unchanged)."""
    rows = [i for i, sp in enumerate(params) if sp.processes_logits]
    if not rows:
        return logits
    out = logits.to(torch.float32, copy=True)
    idx = torch.tensor(rows, device=logits.device)
    done = process_rows(out.index_select(0, idx), [params[i] for i in rows], [history[i] for i in rows])
    out.index_copy_(0, idx, done)
    return out
