"""The two generation endpoints, streaming (server-sent events) and not.

Every request is added to the engine before the response starts, so bad
input is a 4xx, never a broken stream. A stream whose client goes away is
cancelled by Starlette, which closes the generators here and aborts the
engine requests; a non-streaming request watches its connection and does
the same. Errors after the stream started are one ``data: {"error": ...}``
event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fnllm.errors import EngineDeadError
from fnllm.server.protocol import ChatCompletionRequest, CompletionRequest
from fnllm.server.serving import (
    APIError, ChoiceState, Context, chat_inputs, chat_logprobs, check_error, completion_inputs, completion_logprobs,
    engine_error, merged, now_s, prompt_logprobs_json, sse, start, usage,
)
from fnllm.tokenizer import stream_safe_len


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _until_disconnect(request: Request, work) -> object:
    """``await work`` unless the client disconnects first (then cancel it: its requests abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


async def _final_outputs(streams) -> dict[int, object]:
    finals = {}
    async for k, out in merged(streams):
        if out.finished:
            finals[k] = out
    return finals


async def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Turn an error inside a running stream into an error event, then ``[DONE]``."""
    try:
        async for e in events:
            yield e
    except (APIError, EngineDeadError) as e:
        yield sse(engine_error(e).body())
        yield sse("[DONE]")


def _delta(c, st: ChoiceState, params) -> tuple[str, bool] | None:
    """The text to send now for completion ``c`` (None: nothing to send)."""
    check_error(c)
    final = c.finish_reason is not None
    end = len(c.text) if final else stream_safe_len(c.text, params.stop, params.include_stop_str_in_output)
    if end <= st.text and not final:
        return None
    return c.text[st.text:end], final


# -- /v1/completions -----------------------------------------------------------------------------


async def create_completion(ctx: Context, req: CompletionRequest, request: Request) -> Response:
    model = ctx.check_model(req.model)
    prompts, params = completion_inputs(ctx, req)
    streams = await start(ctx, "cmpl", prompts, params, req.priority, "prompt")
    rid, created = streams[0].request_id, now_s()
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    if req.stream:
        return StreamingResponse(_guarded(_completion_events(ctx, req, params, streams, head)),
                                 media_type="text/event-stream")
    finals = await _until_disconnect(request, _final_outputs(streams))
    if isinstance(finals, Response):
        return finals
    choices = []
    for k in sorted(finals):
        for c in finals[k].outputs:
            check_error(c)
            choices.append({
                "index": k * params.n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason, "logprobs": completion_logprobs(ctx, c, 0, req.logprobs or 0, 0),
            })
            if req.prompt_logprobs is not None:  # vLLM's extra, per choice
                choices[-1]["prompt_logprobs"] = prompt_logprobs_json(ctx, finals[k])
    return JSONResponse({**head, "choices": choices, "usage": usage(list(finals.values()))})


async def _completion_events(ctx: Context, req: CompletionRequest, params, streams, head) -> AsyncIterator[str]:
    states: dict[int, ChoiceState] = {}
    finals = {}
    async for k, out in merged(streams):
        for c in out.outputs:
            idx = k * params.n + c.index
            st = states.setdefault(idx, ChoiceState())
            if st.done or (d := _delta(c, st, params)) is None:
                continue
            text, final = d
            lp = completion_logprobs(ctx, c, st.tokens, req.logprobs or 0, st.offset)
            st.text, st.tokens, st.offset, st.done = st.text + len(text), len(c.token_ids), st.offset + len(text), final
            choice = {"index": idx, "text": text, "logprobs": lp,
                      "finish_reason": c.finish_reason if final else None, "stop_reason": c.stop_reason if final else None}
            yield sse({**head, "choices": [choice], "usage": None})
        if out.finished:
            finals[k] = out
    if req.stream_options is not None and req.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(list(finals.values()))})
    yield sse("[DONE]")


# -- /v1/chat/completions ------------------------------------------------------------------------


async def create_chat_completion(ctx: Context, req: ChatCompletionRequest, request: Request) -> Response:
    model = ctx.check_model(req.model)
    prompt, params = chat_inputs(ctx, req)
    streams = await start(ctx, "chatcmpl", [prompt], params, req.priority, "messages")
    rid, created = streams[0].request_id, now_s()
    head = {"id": rid, "object": "chat.completion", "created": created, "model": model}
    if req.stream:
        head["object"] = "chat.completion.chunk"
        return StreamingResponse(_guarded(_chat_events(ctx, req, params, streams, head)),
                                 media_type="text/event-stream")
    finals = await _until_disconnect(request, _final_outputs(streams))
    if isinstance(finals, Response):
        return finals
    out = finals[0]
    choices = []
    for c in out.outputs:
        check_error(c)
        choices.append({
            "index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(ctx, c, 0, req.top_logprobs or 0),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
        })
    body = {**head, "choices": choices, "usage": usage([out])}
    if req.prompt_logprobs is not None:  # vLLM's extra, for the whole response
        body["prompt_logprobs"] = prompt_logprobs_json(ctx, out)
    return JSONResponse(body)


async def _chat_events(ctx: Context, req: ChatCompletionRequest, params, streams, head) -> AsyncIterator[str]:
    states: dict[int, ChoiceState] = {}
    final_out = None
    for i in range(params.n):  # the role first, as OpenAI does
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], "usage": None})
    async for _, out in merged(streams):
        for c in out.outputs:
            st = states.setdefault(c.index, ChoiceState())
            if st.done or (d := _delta(c, st, params)) is None:
                continue
            text, final = d
            lp = chat_logprobs(ctx, c, st.tokens, req.top_logprobs or 0)
            st.text, st.tokens, st.done = st.text + len(text), len(c.token_ids), final
            choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp,
                      "finish_reason": c.finish_reason if final else None}
            if final:
                choice["stop_reason"] = c.stop_reason
            yield sse({**head, "choices": [choice], "usage": None})
        if out.finished:
            final_out = out
    if req.stream_options is not None and req.stream_options.include_usage and final_out is not None:
        yield sse({**head, "choices": [], "usage": usage([final_out])})
    yield sse("[DONE]")
