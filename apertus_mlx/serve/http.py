"""The OpenAI-compatible HTTP server (Starlette on uvicorn): `/v1/chat/completions`, `/v1/completions`,
`/v1/models` and `/health`, over one `Engine` that batches every client's requests."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from apertus_mlx import ApertusError, Engine

from .errors import RequestError, first_line, model_failed
from .pool import Lease, SessionPool
from .requests import Limits, parse_chat, parse_completion
from .turns import Stream, chat_turn, completion_turn

OPEN_PATHS = ("/health",)  # answered without the API key, for supervisors


@dataclass
class ServerConfig:
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 4 * 1024 * 1024
    pool_size: int = 8
    max_active: int = 64
    cors_origins: tuple[str, ...] = ()


def create_app(engine: Engine, config: ServerConfig) -> Starlette:
    """The ASGI app; the caller owns `engine` (and closes it after the server stops)."""
    api = Api(engine, config)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_headers=["*"]))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


class Api:
    """The endpoints. Every refusal is an OpenAI-shaped error; nothing a client sends stops the server."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.pool = SessionPool(engine, config.pool_size, config.max_active)
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        try:
            ready = self.engine.ready
        except ApertusError as e:  # loading failed, or the engine thread ended
            return JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        body = {"status": "ok" if ready else "loading", "active_requests": self.pool.active}
        if ready:
            body["model"] = self.engine.info.name
            body["memory_gb"] = {k: round(v, 3) for k, v in self.engine.memory().items()}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        if (error := self._check_key(request)) is not None:
            return error
        await self._ready()
        model = {"id": self.engine.info.name, "object": "model", "created": self.created, "owned_by": "apertus-mlx"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        return await self._run(request, self._start_chat)

    async def completions(self, request: Request) -> Response:
        return await self._run(request, self._start_completion)

    # ---- one request ------------------------------------------------------------------------------

    async def _run(self, request: Request, start: Callable[[Any], Awaitable[tuple[Any, Any, bool]]]) -> Response:
        if (error := self._check_key(request)) is not None:
            return error
        try:
            body = await self._body(request)
            await self._ready()
            stream, lease, streaming = await start(body)
        except RequestError as e:
            return _error(e)
        if streaming:
            sse = _sse(stream, lease)

            async def cleanup() -> None:  # also when the client left before the first byte was sent
                await sse.aclose()
                await stream.close()
                lease.release()

            return StreamingResponse(
                sse, media_type="text/event-stream", headers=_NO_CACHE, background=BackgroundTask(cleanup)
            )
        try:
            return JSONResponse(await _until_disconnect(request, stream.response()))
        except ApertusError as e:  # the model failed mid-answer (out of memory, a bug): the server goes on
            return _error(model_failed(e))
        finally:
            lease.release()

    async def _start_chat(self, body: Any) -> tuple[Stream, Lease, bool]:
        req = parse_chat(body, self.config.limits)
        self._check_model(req.model)
        turn = chat_turn(self.engine, self.pool, req)
        return await turn.start(), turn.lease, req.stream

    async def _start_completion(self, body: Any) -> tuple[Stream, Lease, bool]:
        req = parse_completion(body, self.config.limits)
        self._check_model(req.model)
        turn = completion_turn(self.engine, self.pool, req)
        return await turn.start(), turn.lease, req.stream

    async def _body(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the request body is over {limit} bytes", status=413, param="body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the request body is over {limit} bytes", status=413, param="body")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"body: not valid JSON ({e})", param="body") from None

    async def _ready(self) -> None:
        try:
            await asyncio.to_thread(self.engine.wait_ready)
        except ApertusError as e:
            raise RequestError(f"the model could not be loaded: {e}", status=503, kind="server_error") from None

    def _check_model(self, name: str | None) -> None:
        known = {self.engine.info.name, str(self.engine.info.path)}
        if name is not None and name not in known:
            raise RequestError(
                f"model {name!r} is not served here; this server has {self.engine.info.name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def _check_key(self, request: Request) -> Response | None:
        key = self.config.api_key
        if key is None or request.url.path in OPEN_PATHS:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        what = "no API key given" if not given else "the API key is wrong"
        message = f"{what}: send the header 'Authorization: Bearer <key>'"
        return _error(RequestError(message, status=401, code="invalid_api_key"))


_NO_CACHE = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(stream: Stream, lease: Lease) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` lines, then `data: [DONE]`. A vanished client cancels the turn
    (Starlette cancels this generator, which closes the engine's stream)."""
    try:
        async with aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except ApertusError as e:
        yield f"data: {json.dumps(model_failed(e).to_dict())}\n\n"
    finally:
        lease.release()
    yield "data: [DONE]\n\n"


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it (and so the turn) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            raise RequestError("the client disconnected", status=499)
    return task.result()


def _error(error: RequestError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = {404: f"no such endpoint: {request.method} {request.url.path}", 405: "method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return _error(RequestError(message, status=exc.status_code, kind=kind))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error(RequestError(f"internal error: {first_line(exc)}", status=500, kind="server_error"))
