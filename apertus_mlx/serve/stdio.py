"""`python -m apertus_mlx.serve --stdio`: JSON-RPC 2.0 over stdin/stdout, one message per line.

The schema is in `docs/protocol.md`. stdout carries protocol lines only: file descriptor 1 is pointed at
stderr while the bridge runs, so a stray `print` or a library's warning cannot corrupt the stream. Every
request with an id runs as its own task (`inflight.py`), so chats stream side by side (batched in the engine)
and any of them can be cancelled; a line that cannot be understood gets an error object, and the bridge goes on.
The framing is in `rpc.py`, the model in `loading.py`; this module dispatches the methods.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import IO, Any

from apertus_mlx import __version__

from .inflight import InFlight, Running, answer_turn
from .loading import Loader
from .requests import ChatRequest, CompletionRequest, Limits, parse_chat, parse_completion
from .responses import ChunkHook
from .rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_ID,
    NOT_INITIALIZED,
    SHUTTING_DOWN,
    UNSUPPORTED_VERSION,
    Malformed,
    RpcError,
    Wire,
    known,
    parse,
    valid_id,
)
from .turns import chat_turn, completion_turn

PROTOCOL_VERSION = "1.0"  # MAJOR.MINOR: a minor version only adds; a client of another major is refused

log = logging.getLogger("apertus_mlx.serve.stdio")


def run_stdio(
    model: str | None,
    pool_size: int = 8,
    limits: Limits | None = None,
    *,
    max_active: int = 64,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> int:
    """Serve JSON-RPC on stdin/stdout (or the binary streams given) until `shutdown` or end of input; returns 0.

    `model` is loaded at once (progress goes to the client once it has sent `initialize`); None waits for a
    `load` request.
    """
    own_stdio = stdout is None
    if own_stdio:
        stdout = _take_stdout()
        if not logging.getLogger().handlers:
            logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="apertus-mlx stdio: %(message)s")
    in_fd = (stdin or sys.stdin.buffer).fileno()
    clean = asyncio.run(_serve(stdout, in_fd, model, pool_size, limits or Limits(), max_active))
    if own_stdio and not clean:
        # The engine thread is still loading a model (it cannot be interrupted). Leave without the interpreter's
        # finalization, which would wait for it (Engine's atexit hook) or abort on a thread still inside MLX.
        sys.stderr.flush()
        os._exit(0)
    return 0


async def _serve(
    out: IO[bytes], in_fd: int, model: str | None, pool_size: int, limits: Limits, max_active: int
) -> bool:
    """Serve until the end; whether the engine was closed cleanly."""
    bridge = Bridge(Wire(out), pool_size, limits, max_active)
    await bridge.serve(in_fd, model)
    return bridge.closed_cleanly


def _take_stdout() -> IO[bytes]:
    """The real stdout, kept for the protocol alone; fd 1 and `sys.stdout` then write to stderr."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


class Bridge:
    """Reads requests, checks and dispatches them to the methods below, and ends on `shutdown` or end of input."""

    def __init__(self, wire: Wire, pool_size: int, limits: Limits, max_active: int):
        self.wire, self.limits = wire, limits
        self.requests = InFlight(wire)
        self.models = Loader(pool_size, max_active, wire.notify, self.requests.end_on)
        self.initialized = False
        self.shutting_down = False
        self.closed_cleanly = True
        self._finished = asyncio.get_running_loop().create_future()

    async def serve(self, in_fd: int, model: str | None) -> None:
        self.wire.start_reading(in_fd)
        log.info("protocol %s, apertus-mlx %s: reading JSON-RPC from stdin", PROTOCOL_VERSION, __version__)
        if model is not None:
            self.models.start(model, None)
        while not self._finished.done():
            line = asyncio.ensure_future(self.wire.line())
            await asyncio.wait({line, self._finished}, return_when=asyncio.FIRST_COMPLETED)
            if not line.done():
                line.cancel()
                break
            raw = line.result()
            if raw is None:  # end of input: the client is gone (after `shutdown`, that one decides)
                if not self.shutting_down:
                    log.info("stdin closed: cancelling %d running request(s) and exiting", len(self.requests))
                    self.shutting_down = True
                    await self._wind_down(cancel=True)
                    break
                await self._finished
                break
            try:
                self._dispatch(raw)
            except Exception:  # a bug in the bridge: logged; the bridge goes on with the next line
                log.exception("internal error on the line %.200r", raw)

    def _dispatch(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            id, method, params = parse(raw)
        except Malformed as e:
            self.wire.error(e.id, e.error)
            return
        if id is NO_ID:  # a notification: never answered, so only `cancel` makes sense as one
            try:
                if method != "cancel" or not isinstance(params, dict):
                    raise RpcError(INVALID_REQUEST, "only cancel may be sent without an id")
                self._cancel(params)
            except RpcError as e:
                log.info("ignored notification %r: %s", method, e.message)
            return
        try:
            self._check_call(id, method)
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params: expected a JSON object")
            if method in _QUICK:
                self.wire.result(id, _QUICK[method](self, params))
                return
        except RpcError as e:
            self.wire.error(id, e)
            return
        except Exception as e:
            log.exception("%s %s failed", method, json.dumps(id))
            self.wire.error(id, RpcError.internal(e))
            return
        self.requests.start(id, method, lambda running: _SLOW[method](self, running, params))

    def _check_call(self, id: Any, method: str) -> None:
        if method not in _QUICK and method not in _SLOW:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {method!r} (see docs/protocol.md)")
        if not self.initialized and method not in ("initialize", "shutdown"):
            raise RpcError(NOT_INITIALIZED, f"{method}: send initialize first")
        if self.shutting_down and method != "cancel":
            raise RpcError(SHUTTING_DOWN, f"{method}: the bridge is shutting down")
        if id in self.requests:
            raise RpcError(INVALID_REQUEST, f"id {json.dumps(id)} is already used by a running request")

    async def _wind_down(self, cancel: bool, keep: Running | None = None) -> None:
        """Cancel (or let finish) every running request but `keep`, then close the engine."""
        await self.requests.end([r for r in self.requests if r is not keep], cancel)
        self.closed_cleanly = await self.models.close()

    # ---- quick methods: answered in order, at once ---------------------------------------------------

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.initialized:
            raise RpcError(INVALID_REQUEST, "initialize: already initialized")
        version = params.get("protocolVersion")
        if not isinstance(version, str):
            raise RpcError(
                INVALID_PARAMS, 'protocolVersion: required, a string such as "1.0"', {"param": "protocolVersion"}
            )
        major = version.split(".")[0]
        if major != PROTOCOL_VERSION.split(".")[0]:
            raise RpcError(
                UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported; this bridge speaks {PROTOCOL_VERSION}",
                {"protocolVersion": PROTOCOL_VERSION},
            )
        client = params.get("clientInfo")
        if isinstance(client, dict):
            log.info("client %s %s", client.get("name", "?"), client.get("version", ""))
        self.initialized = self.models.announce = True
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "serverInfo": {"name": "apertus-mlx", "version": __version__},
            "capabilities": {
                "methods": sorted([*_QUICK, *_SLOW]),
                "chat": {"tools": True, "reasoning": True, "logprobs": True},
                "complete": {"logprobs": True},
                "limits": {"max_tokens": self.limits.max_tokens, "default_max_tokens": self.limits.default_max_tokens},
            },
            "model": self.models.slot.entry() if self.models.slot is not None else None,
        }

    def _models(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"object": "list", "data": [self.models.slot.entry()] if self.models.slot is not None else []}

    def _cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        if "id" not in params or not valid_id(params["id"]):
            raise RpcError(INVALID_PARAMS, "id: required, the id of the request to cancel", {"param": "id"})
        running = self.requests.get(params["id"])
        if running is None or running.method not in ("chat", "complete"):
            return {"cancelled": False}  # finished already, never sent, or not cancellable (load, shutdown)
        running.cancel()
        return {"cancelled": True}

    # ---- slow methods: tasks, answered when done ----------------------------------------------------

    async def _load(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        known(params, {"model"})
        model = params.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise RpcError(INVALID_PARAMS, "model: expected a model directory or repo id", {"param": "model"})
        slot = await self.models.load(model, running.id, running.stopped)
        return {"model": slot.entry()}

    async def _chat(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        # Unlike OpenAI's HTTP API, deltas are the default here: `"stream": false` turns them off.
        req = parse_chat({"stream": True, **params}, self.limits)
        return await answer_turn(running, self.models, req, chat_turn, self._deltas(running, req, "chat.delta"))

    async def _complete(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        req = parse_completion({"stream": True, **params}, self.limits)
        deltas = self._deltas(running, req, "complete.delta")
        return await answer_turn(running, self.models, req, completion_turn, deltas)

    def _deltas(self, running: Running, req: ChatRequest | CompletionRequest, method: str) -> ChunkHook | None:
        """Each chunk sent as a `method` notification on the way; None when the client turned them off."""
        if not req.stream:
            return None
        return lambda chunk: self.wire.notify(method, {"id": running.id, "chunk": chunk})

    async def _shutdown(self, running: Running, params: dict[str, Any]) -> None:
        known(params, {"cancel"})
        cancel = params.get("cancel", False)
        if not isinstance(cancel, bool):
            raise RpcError(INVALID_PARAMS, "cancel: expected a boolean", {"param": "cancel"})
        self.shutting_down = True
        log.info("shutdown: %s %d running request(s)", "cancelling" if cancel else "finishing", len(self.requests) - 1)
        await self._wind_down(cancel, keep=running)
        asyncio.get_running_loop().call_soon(self._finished.set_result, None)  # after this answer is written
        return None


_QUICK: dict[str, Callable[[Bridge, dict[str, Any]], Any]] = {
    "initialize": Bridge._initialize,
    "models": Bridge._models,
    "cancel": Bridge._cancel,
}
_SLOW: dict[str, Callable[[Bridge, Running, dict[str, Any]], Awaitable[Any]]] = {
    "load": Bridge._load,
    "chat": Bridge._chat,
    "complete": Bridge._complete,
    "shutdown": Bridge._shutdown,
}
