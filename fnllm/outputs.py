"""User-facing results, with vLLM's names and shapes."""

from __future__ import annotations

import attrs

from fnllm.state import RequestOutputKind, TokenLogprobs  # noqa: F401 (re-exported)


@attrs.define(kw_only=True)
class CompletionOutput:
    """One of a request's ``n`` samples. ``logprobs`` (when asked) holds, per
    generated token, ``{token_id: logprob}`` for the sampled token and the top ones."""

    index: int
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@attrs.define(kw_only=True)
class RequestOutput:
    """A request's cumulative result. ``error`` says why the device could not
    serve it when it ended with ``finish_reason="error"`` (a poison request
    isolated by the engine)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    # prompt tokens whose KV came from a cache tier (device or host) when the
    # request was first scheduled; None until then (vLLM's field)
    num_cached_tokens: int | None = None
    # speculative decoding (0 when off): draft tokens verified for this
    # request (all its sequences) and how many of them were accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # with SamplingParams.prompt_logprobs: per prompt token, ``{token_id: logprob}``
    # for it and the top ones (None for the first token, as in vLLM); entries
    # not yet computed are None too. ``prompt_logprob_ranks``: each prompt
    # token's rank (1 = the most likely), as vLLM's Logprob.rank.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None


def logprob_dict(entry: TokenLogprobs) -> dict[int, float]:
    """``((sampled, lp), (top1, lp), ...)`` as vLLM's ``{token_id: logprob}``."""
    return {int(t): float(lp) for t, lp in entry}
