"""The FastAPI app (routes, auth, body limits, errors) and `serve`: uvicorn next to the engine core.

Lifecycle: spawn the core and load the tokenizer, bind only once the model is ready, serve until
SIGINT/SIGTERM (drain, then abort) or until the core dies (exit code 1, cause logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnemosyne.config import EngineConfig
from mnemosyne.engine.async_engine import AsyncEngine, EngineDeadError
from mnemosyne.heap import freeze_startup_heap
from mnemosyne.metrics.prometheus import CONTENT_TYPE, ServerMetrics
from mnemosyne.models.loaders import resolve_model
from mnemosyne.server.launch import ServerConfig
from mnemosyne.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from mnemosyne.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

_MAX_DRAINED_BODY_BYTES = 256 * 1024 * 1024
"""An oversized body up to this size is read and dropped before the 413, so the client sees the
answer instead of a reset connection; a bigger declared one is refused without reading."""


@dataclass
class ServerState:
    """What the routes share. Mutable: `is_draining` flips on SIGINT/SIGTERM."""

    engine: AsyncEngine
    serving: OpenAIServing
    metrics: ServerMetrics
    config: ServerConfig
    model_name: str
    is_draining: bool = False


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mnemosyne", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health")
    async def health() -> Response:
        engine = state.engine
        if engine.dead_reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": engine.dead_reason}, status_code=503)
        if state.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "engine_core_pid": engine.pid})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.is_core_alive.set(1 if state.engine.is_alive else 0)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @v1.get("/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != state.model_name:
            raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionRequest, await _read_body(request, state))
        return await state.serving.completions(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await _read_body(request, state))
        return await state.serving.chat(body, request)

    app.include_router(v1)
    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    info = state.engine.info
    assert info is not None
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "mnemosyne",
            "max_model_len": info.max_model_len}


async def _authorize(request: Request) -> None:
    state: ServerState = request.app.state.server
    key = state.config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _read_body(request: Request, state: ServerState) -> bytes:
    """The body, at most max_body_bytes; refuses new work while draining or after the core died."""
    if state.is_draining or state.engine.dead_reason is not None:
        raise APIError(503, "the server is shutting down" if state.is_draining else
                       f"the engine is unavailable: {state.engine.dead_reason}", type="server_error",
                       code="engine_unavailable")
    limit = state.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_DRAINED_BODY_BYTES:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _MAX_DRAINED_BODY_BYTES:
            break
    if size > limit:
        raise APIError(413, f"the request body has more than {limit} bytes, the limit", code="body_too_large")
    return b"".join(chunks)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(APIError(400, "invalid request").body(), status_code=400)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s", request.url.path)
    error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


# -- process lifecycle ---------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn whose signals start a drain and then exit 0 (uvicorn's own re-raise the signal at exit)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.state.is_draining:
            logger.warning("signal %d: no new requests; draining in-flight ones for up to %.0f s",
                           sig, self.state.config.drain_timeout_s)
            asyncio.get_running_loop().call_later(
                self.state.config.drain_timeout_s, self.state.engine.abort_all,
                EngineDeadError("the server is shutting down"))
        self.state.is_draining = True
        super().handle_exit(sig, frame)


_ABORT_GRACE_S = 5.0
"""After the drain timeout aborts what is left, its clients get this long to receive their error."""
_DEAD_LINGER_S = 1.0
"""After the core dies, /health answers 503 this long before the port closes, so probes see why."""


async def _watch_engine(engine: AsyncEngine, server: _Server) -> None:
    await engine.dead_event.wait()
    logger.error("the engine core died; the server exits: %s", engine.dead_reason)
    server.exit_code = 1
    await asyncio.sleep(_DEAD_LINGER_S)
    server.should_exit = True


def serve(engine_config: EngineConfig, config: ServerConfig) -> int:
    """Run the server until a signal (exit 0) or the engine core's death (exit 1)."""
    return asyncio.run(_serve(engine_config, config))


async def _serve(engine_config: EngineConfig, config: ServerConfig) -> int:
    loader = resolve_model(engine_config.model, seed=engine_config.seed)  # a bad model fails before spawning
    if config.log_requests:
        logging.getLogger("mnemosyne.server.serving").setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # until uvicorn takes over: stop loading, kill the core
        loop.add_signal_handler(sig, main_task.cancel)
    metrics = ServerMetrics()
    start_s = time.monotonic()
    tokenizer_task = asyncio.ensure_future(asyncio.to_thread(loader.load_tokenizer))
    try:
        engine = await AsyncEngine.start(engine_config, config.prefill_progress_s, metrics,
                                         logging.getLogger().getEffectiveLevel())
    except asyncio.CancelledError:
        logger.warning("interrupted while loading the model")
        return 130
    except RuntimeError as e:
        logger.error("the engine core failed to start: %s", e)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    try:
        tokenizer = await tokenizer_task
        assert engine.info is not None
        model_name = config.served_model_name or engine.info.model_name
        serving = OpenAIServing(engine, tokenizer, model_name, config, metrics)
        state = ServerState(engine, serving, metrics, config, model_name)
        uv_config = uvicorn.Config(build_app(state), host=config.host, port=config.port, log_config=None,
                                   access_log=logger.isEnabledFor(logging.INFO),
                                   timeout_graceful_shutdown=config.drain_timeout_s + _ABORT_GRACE_S,
                                   lifespan="off")
        server = _Server(uv_config, state)
        freeze_startup_heap()
        watcher = asyncio.create_task(_watch_engine(engine, server))
        print(f"mnemosyne: serving {model_name} on http://{config.host}:{config.port} "
              f"(model loaded in {time.monotonic() - start_s:.1f} s)", file=sys.stderr, flush=True)
        await server.serve()
        watcher.cancel()
        serving.close()
        return server.exit_code
    finally:
        await engine.shutdown()
