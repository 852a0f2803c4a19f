"""The OpenAI-compatible HTTP server: a FastAPI app around an :class:`AsyncLLMEngine`.

Invariants:

- Handlers only add, abort and read outputs; the engine thread is the only
  code that touches the engine.
- Every error is OpenAI's shape ``{"error": {message, type, param, code}}``:
  400 for bad input (naming the field), 401, 404, 429, 503; a 500 only for a
  bug or an engine failure, and no response ever carries a stack trace.
- ``/v1/*`` needs ``Authorization: Bearer <key>`` when a key is set (compared
  in constant time).
- SIGTERM / SIGINT: new requests get 503 while in-flight ones finish (up to
  ``shutdown_timeout``), the rest are aborted, and the process exits 0. A
  dead engine turns ``/health`` to 503, ends the streams with an error event
  and makes the process exit 1.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from typing import Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import fnllm
from fnllm.server.async_engine import AsyncLLMEngine
from fnllm.server.endpoints import create_chat_completion, create_completion
from fnllm.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from fnllm.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from fnllm.server.serving import APIError, Context

logger = logging.getLogger("fnllm.server")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


class ServerState:
    """Mutable flags of one server process (event-loop thread only)."""

    def __init__(self, engine: AsyncLLMEngine, names: list[str], api_key: str | None, metrics: ServerMetrics) -> None:
        self.engine, self.names, self.metrics = engine, names, metrics
        self.api_key = api_key.encode() if api_key else None
        self.ctx = Context(engine, names)
        self.draining = False
        self.exit_code = 0


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class _Gate:
    """ASGI middleware: 503 while draining or dead, 401 on ``/v1`` without the key."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            err = self._check(scope)
            if err is not None:
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        st, path = self.state, scope.get("path", "")
        if path == "/metrics":
            return None
        if st.engine.errored:
            return APIError(503, "the engine has died", type="service_unavailable", code="engine_dead")
        if st.draining:
            return APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
        if st.api_key is not None and path.startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), st.api_key)):
                return APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")
        return None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not loc and first.get("type") == "missing":
        return APIError(400, "a JSON request body is required")
    field = ".".join(loc)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{field or 'body'}: {first.get('msg')}{more}", param=loc[0] if loc else None)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail), code=exc.status_code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, "internal server error", type="internal_error"))


def build_app(engine: AsyncLLMEngine, served_model_names: list[str], *, api_key: str | None = None,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app; ``app.state.server`` holds its :class:`ServerState`."""
    metrics = metrics or ServerMetrics(served_model_names[0])
    state = ServerState(engine, served_model_names, api_key, metrics)
    app = FastAPI(title="fnllm", version=fnllm.__version__, description="OpenAI-compatible API of fnllm")
    app.state.server = state
    _install_errors(app)
    _add_routes(app, state)
    app.add_middleware(_Gate, state=state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    ctx = state.ctx
    v1 = APIRouter(prefix="/v1", responses=_ERRORS)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": fnllm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(req: Union[TokenizeCompletionRequest, TokenizeChatRequest]) -> dict:
        ctx.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            _, ids = ctx.render_chat(req.messages, req.add_generation_prompt)
        else:
            ids = ctx.encode(req.prompt, "prompt", req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest) -> dict:
        ctx.check_model(req.model)
        vocab = ctx.engine.config.model.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens)}

    @v1.get("/models")
    async def models() -> dict:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fnllm", "root": ctx.engine.config.model.model,
                 "max_model_len": ctx.max_model_len} for n in state.names]
        return {"object": "list", "data": data}

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, req, request)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, req, request)

    app.include_router(v1)


# -- running it ----------------------------------------------------------------------------------


class _Server:
    """uvicorn around the app, with fnllm's shutdown: drain on SIGTERM / SIGINT, exit 1 on engine death."""

    def __init__(self, app: FastAPI, host: str, port: int, shutdown_timeout: float, access_log: bool,
                 dead_grace: float) -> None:
        import uvicorn

        self.app, self.state = app, app.state.server
        self.shutdown_timeout, self.dead_grace = shutdown_timeout, dead_grace
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5, access_log=access_log,
                                log_level="info")
        server = uvicorn.Server(config)
        server.handle_exit = self._on_signal  # replaces uvicorn's: drain first, never re-raise the signal
        self.server = server
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining_task = None

    def _on_signal(self, sig: int, frame) -> None:
        if self.loop is None:
            self.server.should_exit = True
        elif self.state.draining:  # a second signal: stop now
            self.server.force_exit = self.server.should_exit = True
        else:
            logger.info("received %s: draining (up to %.0f s)", signal.Signals(sig).name, self.shutdown_timeout)
            self.loop.call_soon_threadsafe(self._start, self._drain)

    def _start(self, coro_fn) -> None:
        self._draining_task = asyncio.ensure_future(coro_fn())

    async def _drain(self) -> None:
        st = self.state
        st.draining = True
        engine = st.engine
        deadline = self.loop.time() + self.shutdown_timeout
        while engine.num_live() and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_live():
            logger.info("shutdown timeout: aborting %d requests", engine.num_live())
            engine.abort_all()
            end = self.loop.time() + 5
            while engine.num_live() and self.loop.time() < end:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the last events reach the clients
        self.server.should_exit = True

    def _on_dead(self, err: BaseException) -> None:  # engine thread
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._start, self._die)

    async def _die(self) -> None:
        logger.error("the engine loop died: %s; exiting", self.state.engine.dead_error)
        self.state.exit_code = 1
        await asyncio.sleep(self.dead_grace)  # the streams send their error events
        self.server.should_exit = True

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        engine = self.state.engine
        engine.on_dead = self._on_dead
        engine.start()
        try:
            await self.server.serve()
        finally:
            engine.shutdown()
        if engine.errored:
            self.state.exit_code = 1
        return self.state.exit_code


def run_server(engine: AsyncLLMEngine, served_model_names: list[str], *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, shutdown_timeout: float = 30.0, access_log: bool = True,
               dead_grace: float = 1.0) -> int:
    """Serve until SIGTERM / SIGINT (exit code 0) or engine death (1; after
    ``dead_grace`` seconds, in which ``/health`` answers 503)."""
    metrics = ServerMetrics(served_model_names[0])
    engine.stat_logger = metrics
    app = build_app(engine, served_model_names, api_key=api_key, metrics=metrics)
    return asyncio.run(_Server(app, host, port, shutdown_timeout, access_log, dead_grace).serve())
