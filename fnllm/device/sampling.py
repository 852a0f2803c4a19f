"""Token sampling from a step's logits: greedy, temperature, top-k, top-p,
min-p, and logprobs (log-softmax of the raw logits, vLLM's default). Logits
processing (allowed ids, bad words, logit bias, penalties:
:mod:`fnllm.device.penalties`) comes first, from plan data only.

Determinism: sample ``j`` of a row draws one uniform number ``u`` from a
BLAKE2b hash of ``(seed, sample_index + j, output_pos)`` (unseeded rows:
``(executor seed, request id, sample_index + j, output_pos)``) and takes the
token where ``u`` falls in the row's filtered cumulative distribution
(inverse-CDF sampling). So a seeded row's tokens depend on its own logits
and those numbers only, never on the batch. Greedy rows use no randomness.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from fnllm.device.penalties import apply_processing
from fnllm.state import SamplingParams, TokenLogprobs

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)


@dataclass(frozen=True)
class SampleRequest:
    """One plan row that samples: its params and random-stream coordinates."""

    params: SamplingParams
    num_samples: int
    sample_index: int
    output_pos: int
    request_id: str = ""
    history: tuple = ()  # (prompt ids, output ids) for penalties and bad words (the plan's ``history`` row)


def stream_uniform(seed: int | None, base_seed: int, request_id: str, index: int, output_pos: int) -> float:
    """A uniform in [0, 1) fixed by the sample's coordinates (stable across
    processes and Python versions: no ``hash()``)."""
    if seed is not None:
        key = b"s" + struct.pack("<QQQ", seed & (2**64 - 1), index, output_pos)
    else:
        key = b"u" + struct.pack("<QQQ", base_seed & (2**64 - 1), index, output_pos) + request_id.encode()
    (x,) = struct.unpack("<Q", hashlib.blake2b(key, digest_size=8).digest())
    return (x >> 11) * (1.0 / (1 << 53))


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax of ``logits / temperature`` after top-k, top-p and min-p, per row (float32)."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    x = logits.float() / temps[:, None]
    vocab = x.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        kth = torch.topk(x, max(ks), dim=-1).values
        thresh = kth.gather(1, torch.tensor(ks, device=dev)[:, None] - 1)
        x = x.masked_fill(x < thresh, float("-inf"))
    top_ps = [p.top_p for p in params]
    if min(top_ps) < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, -1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop = before > torch.tensor(top_ps, device=dev)[:, None]
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, -1)
    min_ps = [p.min_p for p in params]
    if max(min_ps) > 0:
        floor = probs.max(-1, keepdim=True).values * torch.tensor(min_ps, device=dev)[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _draw(probs: torch.Tensor, rows: list[int], uniforms: list[float]) -> list[int]:
    """Inverse-CDF draws: sample ``k`` takes row ``rows[k]`` and ``uniforms[k]``."""
    cdf = probs.double().cumsum(-1)
    r = torch.tensor(rows, device=probs.device)
    target = torch.tensor(uniforms, dtype=torch.float64, device=probs.device) * cdf[r, -1]
    idx = torch.searchsorted(cdf[r], target[:, None], right=True)[:, 0]
    return idx.clamp_(max=probs.shape[-1] - 1).tolist()


def _logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], ks: list[int]) -> list[TokenLogprobs]:
    lp = torch.log_softmax(_rows(logits, rows).float(), -1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    top_v, top_i = torch.topk(lp, max(ks), dim=-1) if max(ks) else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [
        ((tok, c),) + tuple(zip(ti[:k], tv[:k]))
        for tok, c, ti, tv, k in zip(tokens, chosen, top_i, top_v, ks)
    ]


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits[rows]`` without a copy when ``rows`` is every row in order."""
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        return logits
    return logits.index_select(0, torch.tensor(rows, device=logits.device))


def sample(logits: torch.Tensor, reqs: list[SampleRequest], base_seed: int = 0, memo=None):
    """Draw tokens for every row of ``logits`` (row ``i`` <-> ``reqs[i]``).

    Returns ``(sampled, logprobs)``: per row a tuple of ``num_samples`` ids,
    and per row a tuple of :data:`TokenLogprobs` per sample, or ``None`` when
    no row asked for logprobs.
    """
    raw = logits  # logprobs are of the raw logits (vLLM's default)
    logits = apply_processing(logits, [r.params for r in reqs], [r.history for r in reqs], memo)
    tokens: list[list[int]] = [[0] * r.num_samples for r in reqs]
    greedy = [i for i, r in enumerate(reqs) if r.params.temperature < SAMPLING_EPS]
    if greedy:
        # max's indices: the first maximum, like argmax, and fast in bfloat16 too
        best = _rows(logits, greedy).max(-1).indices.tolist()
        for i, t in zip(greedy, best):
            tokens[i] = [t] * reqs[i].num_samples
    rand = [i for i, r in enumerate(reqs) if r.params.temperature >= SAMPLING_EPS]
    if rand:
        probs = _filtered_probs(_rows(logits, rand), [reqs[i].params for i in rand])
        slots = [(k, i, j) for k, i in enumerate(rand) for j in range(reqs[i].num_samples)]
        us = [
            stream_uniform(reqs[i].params.seed, base_seed, reqs[i].request_id, reqs[i].sample_index + j, reqs[i].output_pos)
            for _, i, j in slots
        ]
        for (_, i, j), t in zip(slots, _draw(probs, [k for k, _, _ in slots], us)):
            tokens[i][j] = t
    sampled = tuple(tuple(t) for t in tokens)
    if all(r.params.logprobs is None for r in reqs):
        return sampled, None
    return sampled, _collect_logprobs(raw, reqs, sampled)


def _collect_logprobs(logits, reqs: list[SampleRequest], sampled):
    flat = [(i, t) for i, r in enumerate(reqs) if r.params.logprobs is not None for t in sampled[i]]
    rows = [i for i, _ in flat]
    got = iter(_logprobs(logits, rows, [t for _, t in flat], [reqs[i].params.logprobs for i in rows])) if flat else iter(())
    return tuple(
        tuple(next(got) for _ in sampled[i]) if r.params.logprobs is not None else ()
        for i, r in enumerate(reqs)
    )


def prompt_logprobs(logits: torch.Tensor, plan) -> tuple:
    """Per plan row, a :data:`~fnllm.state.PromptLogprob` for each of its
    ``plan.prompt_targets``: ``logits`` holds their positions' logits, row by
    row. Log-softmax of the raw logits; rank 1 is the most likely token."""
    out, at = [], 0
    for r, targets in enumerate(plan.prompt_targets):
        if not targets:
            out.append(())
            continue
        k = plan.sampling[r].prompt_logprobs or 0
        entries = []
        for lo in range(0, len(targets), 256):  # bounded float32 copies of [chunk, vocab]
            tgt = targets[lo : lo + 256]
            lp = torch.log_softmax(logits[at + lo : at + lo + len(tgt)].float(), -1)
            ids = torch.tensor(tgt, dtype=torch.int64, device=lp.device)[:, None]
            chosen = lp.gather(1, ids)
            ranks = ((lp > chosen).sum(-1) + 1).tolist()
            top_v, top_i = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for t, c, rk, ti, tv in zip(tgt, chosen[:, 0].tolist(), ranks, top_i.tolist(), top_v.tolist()):
                entries.append((rk, ((t, c),) + tuple(zip(ti, tv))))
        out.append(tuple(entries))
        at += len(targets)
    return tuple(out)
