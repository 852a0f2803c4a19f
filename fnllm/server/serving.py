"""OpenAI completions and chat completions over an :class:`AsyncLLMEngine`.

Requests become prompts and ``SamplingParams`` here (bad values: :class:`APIError`
400 naming the field); engine outputs become OpenAI responses or
server-sent-event chunks. A stream never sends text that a stop string may
still cut (``stream_safe_len``), so the streamed text equals the
non-streamed text. Every error is an :class:`APIError` in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from typing import AsyncIterator

from fnllm.errors import EngineDeadError
from fnllm.server.async_engine import AsyncLLMEngine, QueueFullError, RequestStream
from fnllm.server.guided import guided_params
from fnllm.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from fnllm.state import SamplingParams
from fnllm.tokenizer import stream_safe_len


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def engine_error(e: BaseException) -> APIError:
    """The API error for an exception raised by the engine."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="service_unavailable", code="engine_dead")
    return APIError(500, "internal server error", type="internal_error")


PROCESSING_FIELDS = ("logit_bias", "allowed_token_ids", "bad_words", "prompt_logprobs", "truncate_prompt_tokens",
                     "presence_penalty", "frequency_penalty", "repetition_penalty")


def _param_of(message: str, prompt_field: str) -> str | None:
    """The request field an engine ``ValueError`` message is about."""
    named = next((f for f in PROCESSING_FIELDS if message.startswith(f)), None)
    if named is not None:
        return named
    if "max_tokens" in message:
        return "max_tokens"
    if "prompt" in message or "vocabulary" in message:
        return prompt_field
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else None


class Context:
    """What the handlers share: the engine, names, limits, the tokenizer."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.names = served_model_names
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.scheduler.max_model_len

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.names[0]
        if model not in self.names:
            raise APIError(404, f"the model {model!r} does not exist; served: {self.names}", param="model",
                           code="model_not_found")
        return model

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise APIError(400, f"{field} is empty", param=field)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give token ids", param=field)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        return text, list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _unsupported(req) -> None:
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs are not available when stream=true", param="prompt_logprobs")


def _processing(req) -> dict:
    """The penalty and logits-processing arguments (OpenAI's logit_bias clamped to [-100, 100], as vLLM does)."""
    bias = None
    if req.logit_bias:
        bias = {k: min(100.0, max(-100.0, v)) for k, v in req.logit_bias.items()}
    return dict(
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=bias, allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words or (), prompt_logprobs=req.prompt_logprobs,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
    )


def sampling_params(req, max_tokens: int, logprobs: int | None, prompt_field: str) -> SamplingParams:
    try:
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop or (), stop_token_ids=req.stop_token_ids or (),
            include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos, logprobs=logprobs,
            guided_decoding=guided_params(req),
            **_processing(req),
        )
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e), prompt_field)) from None


# -- building requests ------------------------------------------------------------------------


def completion_inputs(ctx: Context, req: CompletionRequest) -> tuple[list[dict], SamplingParams]:
    _unsupported(req)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (or be null)", param="best_of")
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append({"prompt": item, "prompt_token_ids": ctx.encode(item, "prompt")})
        else:
            if not item:
                raise APIError(400, "prompt is empty", param="prompt")
            prompts.append({"prompt_token_ids": list(item)})
    return prompts, sampling_params(req, req.max_tokens, req.logprobs, "prompt")


def chat_inputs(ctx: Context, req: ChatCompletionRequest) -> tuple[dict, SamplingParams]:
    _unsupported(req)
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    text, ids = ctx.render_chat(req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = ctx.max_model_len - len(ids)
        if max_tokens < 1:
            raise APIError(400, f"the messages take {len(ids)} tokens, max_model_len is {ctx.max_model_len}",
                           param="messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return {"prompt": text, "prompt_token_ids": ids}, sampling_params(req, max_tokens, logprobs, "messages")


async def start(ctx: Context, prefix: str, prompts: list[dict], params: SamplingParams, priority: int,
                prompt_field: str) -> list[RequestStream]:
    """Add every prompt as an engine request; on any failure abort those added."""
    base = f"{prefix}-{uuid.uuid4().hex}"
    streams: list[RequestStream] = []
    try:
        for k, prompt in enumerate(prompts):
            rid = base if len(prompts) == 1 else f"{base}-{k}"
            streams.append(await ctx.engine.add_request(rid, prompt, params, priority))
    except BaseException as e:
        for s in streams:
            s.abort()
        if isinstance(e, ValueError):
            msg = re.sub(r"^request '[^']*' rejected: ", "", str(e))
            raise APIError(400, msg, param=_param_of(msg, prompt_field)) from None
        if isinstance(e, (QueueFullError, EngineDeadError)):
            raise engine_error(e) from None
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """``(k, output)`` from every stream as they come; closing it aborts what is left."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((k, out, None))
            queue.put_nowait((k, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((k, None, e))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            k, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                left -= 1
            else:
                yield k, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


# -- building responses ------------------------------------------------------------------------


def _lp(x: float) -> float:
    """A logprob JSON can carry (no -inf or NaN)."""
    return -9999.0 if math.isnan(x) else max(float(x), -9999.0)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


class ChoiceState:
    """What has been sent of one choice (text length, tokens) in a stream."""

    def __init__(self) -> None:
        self.text = 0
        self.tokens = 0
        self.done = False
        self.offset = 0


def usage(outs: list) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def check_error(c) -> None:
    if c.finish_reason == "error":
        raise APIError(500, "the engine failed to run this request; it was ended and the server keeps serving",
                       type="internal_error", code="engine_error")


def completion_logprobs(ctx: Context, c, start: int, k: int, offset: int) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        s = ctx.token_text(tid)
        tokens.append(s)
        lps.append(_lp(entry.get(tid, -math.inf)))
        tops.append({ctx.token_text(t): _lp(v) for t, v in _top(entry, k)} if k else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(ctx: Context, c, start: int, k: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        s = ctx.token_text(tid)
        content.append({
            "token": s, "logprob": _lp(entry.get(tid, -math.inf)), "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := ctx.token_text(i)), "logprob": _lp(v), "bytes": list(t.encode("utf-8"))}
                for i, v in _top(entry, k)
            ],
        })
    return {"content": content}


def prompt_logprobs_json(ctx: Context, out) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or
    ``{token_id: {logprob, rank, decoded_token}}`` for it and the top ones."""
    if out.prompt_logprobs is None:
        return None
    result = []
    for pos, (entry, rank) in enumerate(zip(out.prompt_logprobs, out.prompt_logprob_ranks)):
        if entry is None:
            result.append(None)
            continue
        tid = out.prompt_token_ids[pos]
        ranked = {t: k + 1 for k, (t, _) in enumerate(_top(entry, len(entry)))}  # the top ones: 1..k
        result.append({
            str(t): {"logprob": _lp(v), "rank": rank if t == tid else ranked[t], "decoded_token": ctx.token_text(t)}
            for t, v in entry.items()
        })
    return result


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def now_s() -> int:
    return int(time.time())
