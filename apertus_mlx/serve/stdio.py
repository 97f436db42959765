"""`python -m apertus_mlx.serve --stdio`: JSON-RPC 2.0 over stdin/stdout, one message per line.

The schema is in `docs/protocol.md`. stdout carries protocol lines only: file descriptor 1 is pointed at
stderr while the bridge runs, so a stray `print` or a library's warning cannot corrupt the stream. Every
request with an id runs as its own task, so chats stream side by side (batched in the engine) and any
of them can be cancelled; a line that cannot be understood gets an error object, and the bridge goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import IO, Any

from apertus_mlx import ApertusError, Done, Engine, EngineClosedError, Stats, __version__
from apertus_mlx.progress import LoadProgress

from .errors import RequestError
from .pool import SessionPool
from .requests import Limits, parse_chat, parse_completion
from .responses import ChatStream, CompletionStream, LogprobText

PROTOCOL_VERSION = "1.0"  # MAJOR.MINOR: a minor version only adds; a client of another major is refused

# JSON-RPC 2.0's own codes, and ours in its server range (-32000 to -32099); docs/protocol.md lists them.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
MODEL_ERROR = -32000  # the model failed while answering (out of memory, a bug); the bridge goes on
NO_MODEL = -32001  # no model is loaded, or loading it failed
NOT_INITIALIZED = -32002  # a request before `initialize`
BUSY = -32003  # too many requests running or queued
SHUTTING_DOWN = -32004  # a request after `shutdown`
UNSUPPORTED_VERSION = -32005  # `initialize` with a protocol major version this bridge does not speak

PROGRESS_EVERY = 0.1  # seconds between two progress notifications of one load (first and last always go)
CLOSE_TIMEOUT = 30.0  # seconds to wait for the engine thread at exit (it cannot stop in the middle of a load)

log = logging.getLogger("apertus_mlx.serve.stdio")


class RpcError(Exception):
    """A JSON-RPC error object: `code`, one-line `message`, optional `data`."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def from_request_error(cls, e: RequestError) -> RpcError:
        """An OpenAI-style refusal: the same message, with OpenAI's error object and the field at fault as `data`."""
        code = {429: BUSY, 503: NO_MODEL}.get(e.status, MODEL_ERROR if e.status >= 500 else INVALID_PARAMS)
        return cls(code, e.message, {**e.to_dict(), "param": e.param})


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
    bridge = Bridge(stdout, pool_size=pool_size, limits=limits or Limits(), max_active=max_active)
    code = asyncio.run(bridge.serve(in_fd, model))
    if own_stdio and not bridge.closed_cleanly:
        # The engine thread is still loading a model (it cannot be interrupted). Leave without the interpreter's
        # finalization, which would wait for it (Engine's atexit hook) or abort on a thread still inside MLX.
        sys.stderr.flush()
        os._exit(code)
    return code


def _take_stdout() -> IO[bytes]:
    """The real stdout, kept for the protocol alone; fd 1 and `sys.stdout` then write to stderr."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


# ---- the loaded model ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Slot:
    """One model: loading, ready or failed. `ready` resolves once loading has ended; `error` says if it failed."""

    requested: str | None  # what `--model` or `load` asked for (None: the default choice)
    ready: asyncio.Future[None]
    watchers: list[Any]  # ids of the `load` requests told about its progress (None: the `--model` load)
    engine: Engine | None = None
    pool: SessionPool | None = None
    task: asyncio.Task[None] | None = None
    error: str | None = None
    last_progress: tuple[str, float] = ("", 0.0)  # stage and time of the last notification sent

    def entry(self) -> dict[str, Any]:
        """The slot as a `models` entry."""
        info = self.engine.info if self.engine is not None else None
        status = "failed" if self.error else "ready" if self.ready.done() else "loading"
        out: dict[str, Any] = {
            "id": info.name if info else self.requested,
            "object": "model",
            "owned_by": "apertus-mlx",
        }
        out["status"] = status
        if info is not None:
            out.update({k: v for k, v in info.to_dict().items() if k != "name"})
        if self.error:
            out["error"] = self.error
        if self.engine is not None and self.engine.note:
            out["note"] = self.engine.note
        return out


@dataclass(eq=False)
class Running:
    """A request in flight: its task, and for chats and completions what `cancel` needs."""

    id: Any
    method: str
    task: asyncio.Task[None] | None = None
    slot: Slot | None = None
    session: Any = None  # the leased chat while its turn runs
    stopped: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def cancelled(self) -> bool:
        return self.stopped.done()

    def cancel(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)  # wakes a request still waiting for its model
        if self.session is not None:
            self.session.cancel()  # the engine ends the turn after the current token: Done("cancelled")


# ---- the bridge ---------------------------------------------------------------------------------------


class Bridge:
    """Reads requests, runs them as tasks, writes responses and notifications, one JSON object per line."""

    def __init__(self, out: IO[bytes], pool_size: int = 8, limits: Limits | None = None, max_active: int = 64):
        self.out, self.pool_size, self.limits, self.max_active = out, pool_size, limits or Limits(), max_active
        self.slot: Slot | None = None
        self.running: dict[Any, Running] = {}
        self.initialized = False
        self.shutting_down = False
        self.closed_cleanly = True
        self._out_broken = False
        self._write_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lines: asyncio.Queue[bytes | None] | None = None
        self._finished: asyncio.Future[None] | None = None

    async def serve(self, in_fd: int, model: str | None) -> int:
        self._loop = asyncio.get_running_loop()
        self._lines = asyncio.Queue()
        self._finished = self._loop.create_future()
        threading.Thread(target=self._read, args=(in_fd,), name="stdio-reader", daemon=True).start()
        log.info("protocol %s, apertus-mlx %s: reading JSON-RPC from stdin", PROTOCOL_VERSION, __version__)
        if model is not None:
            self._start_load(model, None)
        while not self._finished.done():
            line = asyncio.ensure_future(self._lines.get())
            await asyncio.wait({line, self._finished}, return_when=asyncio.FIRST_COMPLETED)
            if not line.done():
                line.cancel()
                break
            raw = line.result()
            if raw is None:  # end of input: the client is gone (after `shutdown`, that one decides)
                if not self.shutting_down:
                    log.info("stdin closed: cancelling %d running request(s) and exiting", len(self.running))
                    self.shutting_down = True
                    await self._wind_down(cancel=True)
                    break
                await self._finished
                break
            try:
                self._dispatch(raw)
            except Exception:  # a bug in the bridge: logged; the bridge goes on with the next line
                log.exception("internal error on the line %.200r", raw)
        return 0

    def _read(self, fd: int) -> None:
        """The reader thread: raw reads (no buffered object's lock is held at exit), split into lines."""
        rest = b""
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                if rest.strip():
                    self._post_line(rest)
                self._post_line(None)
                return
            rest += data
            *lines, rest = rest.split(b"\n")
            for line in lines:
                self._post_line(line)

    def _post_line(self, line: bytes | None) -> None:
        _call_soon(self._loop, self._lines.put_nowait, line)

    # ---- output ---------------------------------------------------------------------------------------

    def _write(self, message: dict[str, Any]) -> None:
        line = json.dumps({"jsonrpc": "2.0", **message}, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._write_lock:
            try:
                self.out.write(line.encode("utf-8"))
                self.out.flush()
            except (ValueError, OSError) as e:  # the client stopped reading (a broken pipe): as if it left
                if not self._out_broken:
                    self._out_broken = True
                    log.info("stdout closed (%s): ending", type(e).__name__)
                    self._post_line(None)

    def _result(self, id: Any, result: Any) -> None:
        self._write({"id": id, "result": result})

    def _error(self, id: Any, error: RpcError) -> None:
        self._write({"id": id, "error": error.to_dict()})

    def _notify(self, method: str, params: dict[str, Any]) -> None:
        self._write({"method": method, "params": params})

    # ---- one line -------------------------------------------------------------------------------------

    def _dispatch(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError) as e:  # also bad UTF-8, too deep nesting, a number too long
            self._error(None, RpcError(PARSE_ERROR, f"parse error: not valid JSON ({_line(e)})"))
            return
        try:
            id, method, params = _envelope(message)
        except RpcError as e:
            self._error(message.get("id") if isinstance(message, dict) and _valid_id(message.get("id")) else None, e)
            return
        if id is _NO_ID:  # a notification: never answered, so only `cancel` makes sense as one
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
                self._result(id, _QUICK[method](self, params))
                return
        except RpcError as e:
            self._error(id, e)
            return
        except Exception as e:
            log.exception("%s %s failed", method, json.dumps(id))
            self._error(id, RpcError(INTERNAL_ERROR, f"internal error: {_line(e) or type(e).__name__}"))
            return
        running = Running(id, method)
        self.running[id] = running
        running.task = asyncio.ensure_future(self._run(running, _SLOW[method](self, running, params)))

    def _check_call(self, id: Any, method: str) -> None:
        if method not in _QUICK and method not in _SLOW:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {method!r} (see docs/protocol.md)")
        if not self.initialized and method not in ("initialize", "shutdown"):
            raise RpcError(NOT_INITIALIZED, f"{method}: send initialize first")
        if self.shutting_down and method != "cancel":
            raise RpcError(SHUTTING_DOWN, f"{method}: the bridge is shutting down")
        if id in self.running:
            raise RpcError(INVALID_REQUEST, f"id {json.dumps(id)} is already used by a running request")

    async def _run(self, running: Running, work: Awaitable[Any]) -> None:
        try:
            result = await work
        except RpcError as e:
            self._error(running.id, e)
        except RequestError as e:
            self._error(running.id, RpcError.from_request_error(e))
        except Exception as e:  # a bug in the bridge: answered, logged with its traceback, and the bridge goes on
            log.exception("%s %s failed", running.method, json.dumps(running.id))
            self._error(running.id, RpcError(INTERNAL_ERROR, f"internal error: {_line(e) or type(e).__name__}"))
        else:
            self._result(running.id, result)
            log.info("%s %s: %s in %.2f s", running.method, json.dumps(running.id), _summary(result), running.age)
        finally:
            if self.running.get(running.id) is running:
                del self.running[running.id]

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
        self.initialized = True
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "serverInfo": {"name": "apertus-mlx", "version": __version__},
            "capabilities": {
                "methods": sorted([*_QUICK, *_SLOW]),
                "chat": {"tools": True, "reasoning": True, "logprobs": True},
                "complete": {"logprobs": True},
                "limits": {"max_tokens": self.limits.max_tokens, "default_max_tokens": self.limits.default_max_tokens},
            },
            "model": self.slot.entry() if self.slot is not None else None,
        }

    def _models(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"object": "list", "data": [self.slot.entry()] if self.slot is not None else []}

    def _cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        if "id" not in params or not _valid_id(params["id"]):
            raise RpcError(INVALID_PARAMS, "id: required, the id of the request to cancel", {"param": "id"})
        running = self.running.get(params["id"])
        if running is None or running.method not in ("chat", "complete"):
            return {"cancelled": False}  # finished already, never sent, or not cancellable (load, shutdown)
        running.cancel()
        return {"cancelled": True}

    # ---- slow methods: tasks, answered when done ----------------------------------------------------

    async def _load(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        _known(params, {"model"})
        model = params.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise RpcError(INVALID_PARAMS, "model: expected a model directory or repo id", {"param": "model"})
        slot = self.slot
        if slot is not None and slot.requested == model and not slot.error:
            slot.watchers.append(running.id)  # the same model, loading or loaded: wait for it, do not reload
        else:
            slot = self._start_load(model, running.id)
        try:
            await asyncio.wait({slot.ready, running.stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if running.id in slot.watchers:
                slot.watchers.remove(running.id)
        if not slot.ready.done():
            raise RpcError(SHUTTING_DOWN, "load: interrupted: the bridge is shutting down")
        if slot.error:
            raise RpcError(NO_MODEL, f"the model could not be loaded: {slot.error}")
        return {"model": slot.entry()}

    async def _chat(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        # Unlike OpenAI's HTTP API, deltas are the default here: `"stream": false` turns them off.
        req = parse_chat({"stream": True, **params}, self.limits)
        method = "chat.delta" if req.stream else None
        slot = await self._model(running, req.model)
        if slot is None:
            return await _answer(ChatRelay(_cancelled(), req.model or "", None, False), self, running, method)
        lease = slot.pool.lease(req.messages, req.system, req.tools, req.think)
        try:
            events = await self._start(running, lease, slot.engine.astream(lease.session, None, **req.options))
            text = LogprobText(slot.engine.tokenizer) if req.logprobs else None
            stream = ChatRelay(events, slot.engine.info.name, text, req.include_usage)
            return await _answer(stream, self, running, method)
        finally:
            running.session = None  # the chat goes back to the pool: a late cancel must not reach its next turn
            lease.release()

    async def _complete(self, running: Running, params: dict[str, Any]) -> dict[str, Any]:
        req = parse_completion({"stream": True, **params}, self.limits)
        method = "complete.delta" if req.stream else None
        slot = await self._model(running, req.model)
        if slot is None:
            return await _answer(CompletionRelay(_cancelled(), req.model or "", None, False), self, running, method)
        lease = slot.pool.lease([])
        try:
            events = await self._start(running, lease, slot.engine.acomplete(lease.session, req.prompt, **req.options))
            text = LogprobText(slot.engine.tokenizer) if "logprobs" in req.options else None
            stream = CompletionRelay(events, slot.engine.info.name, text, req.include_usage)
            return await _answer(stream, self, running, method)
        finally:
            running.session = None
            lease.release()

    async def _shutdown(self, running: Running, params: dict[str, Any]) -> None:
        _known(params, {"cancel"})
        cancel = params.get("cancel", False)
        if not isinstance(cancel, bool):
            raise RpcError(INVALID_PARAMS, "cancel: expected a boolean", {"param": "cancel"})
        self.shutting_down = True
        log.info("shutdown: %s %d running request(s)", "cancelling" if cancel else "finishing", len(self.running) - 1)
        await self._wind_down(cancel, keep=running)
        self._loop.call_soon(self._finished.set_result, None)  # after this answer is written
        return None

    # ---- helpers ----------------------------------------------------------------------------------------

    def _start_load(self, model: str | None, watcher: Any) -> Slot:
        """Replace the model: requests on the old one end as cancelled, its engine closes, the new one loads."""
        old = self.slot
        slot = Slot(model, self._loop.create_future(), [watcher])
        self.slot = slot
        slot.task = asyncio.ensure_future(self._bring_up(slot, old))
        return slot

    async def _bring_up(self, slot: Slot, old: Slot | None) -> None:
        if old is not None:
            if old.task is not None:
                await asyncio.wait({old.task})  # one load at a time: a load cannot be interrupted
            on_old = [r for r in self.running.values() if r.slot is old]
            for running in on_old:
                running.cancel()
            if on_old:
                await asyncio.wait({r.task for r in on_old if r.task is not None})
            if old.engine is not None:
                await _off_loop(old.engine.close, True)
        log.info("loading %s", slot.requested or "the default model")
        t0 = time.monotonic()
        try:
            slot.engine = Engine(slot.requested, progress=lambda p: _call_soon(self._loop, self._progress, slot, p))
            await _off_loop(slot.engine.wait_ready)
            slot.pool = SessionPool(slot.engine, self.pool_size, self.max_active)
        except Exception as e:
            slot.error = _line(e) or type(e).__name__
            log.error("loading %s failed: %s", slot.requested or "the default model", slot.error)
            slot.ready.set_result(None)
            return
        info = slot.engine.info
        log.info("loaded %s (%s) in %.1f s", info.name, info.quantization, time.monotonic() - t0)
        if slot.engine.note:
            log.info("%s", slot.engine.note)
        slot.ready.set_result(None)

    def _progress(self, slot: Slot, p: LoadProgress) -> None:
        now = time.monotonic()
        last_stage, last_time = slot.last_progress
        final = p.total is not None and p.done >= p.total
        if p.stage == last_stage and not final and p.done and now - last_time < PROGRESS_EVERY:
            return
        slot.last_progress = (p.stage, now)
        params = {k: v for k, v in p.to_dict().items() if k != "type"}
        for watcher in list(slot.watchers):
            if watcher is not None or (self.initialized and slot is self.slot):
                self._notify("progress", {"id": watcher, **params})

    async def _model(self, running: Running, name: str | None) -> Slot | None:
        """The model to answer with, once it is ready (None: the request was cancelled while it waited).

        A request is cancelled with its model if a `load` replaces it.
        """
        while True:
            slot = self.slot
            if slot is None:
                raise RpcError(NO_MODEL, "no model is loaded: send load first")
            await asyncio.wait({slot.ready, running.stopped}, return_when=asyncio.FIRST_COMPLETED)
            if running.cancelled:
                return None
            if slot is not self.slot:  # replaced while loading: wait for the new one
                continue
            if slot.error:
                raise RpcError(NO_MODEL, f"the model could not be loaded: {slot.error}")
            break
        info = slot.engine.info
        if name is not None and name not in (info.name, str(info.path)):
            raise RequestError(
                f"model {name!r} is not loaded here; this bridge has {info.name!r} (send load to change it)",
                status=404,
                param="model",
                code="model_not_found",
            )
        running.slot = slot
        return slot

    async def _start(self, running: Running, lease: Any, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Start the turn now, so bad input (too long for the context, a bad option) is an error, not a stream."""
        running.session = lease.session  # from here on, `cancel` reaches the turn
        try:
            first = await anext(events)
        except EngineClosedError as e:
            raise RpcError(NO_MODEL, f"the model was unloaded: {_line(e)}") from None
        except (ApertusError, ValueError) as e:
            message = _line(e)
            code = "context_length_exceeded" if "context" in message else None
            raise RequestError(message, param="messages" if code else None, code=code) from None
        if running.cancelled:
            lease.session.cancel()

        async def chained() -> AsyncIterator[Any]:
            async with aclosing(events):
                yield first
                async for event in events:
                    yield event

        return chained()

    async def _wind_down(self, cancel: bool, keep: Running | None = None) -> None:
        """Cancel (or let finish) every running request, then close the engine."""
        others = [r for r in self.running.values() if r is not keep]
        if cancel:
            for running in others:
                running.cancel()
        tasks = {r.task for r in others if r.task is not None}
        if tasks:
            await asyncio.wait(tasks)
        slot = self.slot
        if slot is None:
            return
        if not slot.ready.done() or slot.engine is None:  # still loading: that cannot be interrupted
            self.closed_cleanly = False
            return
        self.closed_cleanly = await _off_loop(slot.engine.close, True, CLOSE_TIMEOUT)


class Relay:
    """A chunk stream that also sends every chunk as a notification, and says `cancelled` when the turn was."""

    bridge: Bridge | None = None
    running: Running | None = None
    method: str | None = None  # the notification's method; None: no deltas (`"stream": false`)
    done: Any

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        async with aclosing(super().chunks()) as chunks:  # type: ignore[misc]
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    if choice["finish_reason"] and self.done is not None and self.done.finish_reason == "cancelled":
                        choice["finish_reason"] = "cancelled"  # OpenAI's shape says "stop"; a client here asked
                if self.method is not None:
                    self.bridge._notify(self.method, {"id": self.running.id, "chunk": chunk})
                yield chunk


class ChatRelay(Relay, ChatStream):
    pass


class CompletionRelay(Relay, CompletionStream):
    pass


async def _answer(stream: Relay, bridge: Bridge, running: Running, method: str | None) -> dict[str, Any]:
    """The whole response, each chunk sent on the way as a `method` notification."""
    stream.bridge, stream.running, stream.method = bridge, running, method
    try:
        return await stream.response()
    except EngineClosedError as e:
        raise RpcError(NO_MODEL, f"the model was unloaded: {_line(e)}") from None
    except ApertusError as e:  # the model failed mid-answer (out of memory, a bug): the bridge goes on
        message = _line(e)
        data = RequestError(message, status=500, kind="server_error").to_dict()
        raise RpcError(MODEL_ERROR, message, {**data, "param": None}) from None


async def _cancelled() -> AsyncIterator[Any]:
    """The events of a turn cancelled before it started (while its model was loading)."""
    yield Done("cancelled", Stats(0, 0, 0, 0.0, 0.0, 0.0, 0.0))


def _summary(result: Any) -> str:
    """A log line's worth of a result."""
    if isinstance(result, dict) and "choices" in result:
        usage = result.get("usage") or {}
        finish = result["choices"][0]["finish_reason"] if result["choices"] else None
        return f"{finish}, {usage.get('prompt_tokens', 0)} + {usage.get('completion_tokens', 0)} tokens"
    return "ok"


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """`fn(*args)` on `loop`, from any thread; nothing once the loop has closed (the bridge has ended)."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _off_loop(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` on a daemon thread, awaited. Unlike `asyncio.to_thread`, a call that never returns (a load
    that hangs) does not hold up the loop's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as e:
            value, ok = e, False
        _call_soon(loop, settle, ok, value)

    threading.Thread(target=run, name="stdio-wait", daemon=True).start()
    return future


# ---- the envelope -------------------------------------------------------------------------------------

_NO_ID = object()


def _envelope(message: Any) -> tuple[Any, str, Any]:
    """(id or _NO_ID, method, params) of a JSON-RPC request; RpcError(-32600) for anything else."""
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "invalid request: batches are not supported; send one message per line")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: expected a JSON object")
    if message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    id = message.get("id", _NO_ID)
    if id is not _NO_ID and not _valid_id(id):
        raise RpcError(INVALID_REQUEST, "invalid request: id must be a string or an integer")
    method = message.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string')
    return id, method, message.get("params", {})


def _valid_id(id: Any) -> bool:
    return isinstance(id, str) or (isinstance(id, int) and not isinstance(id, bool))


def _known(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RpcError(INVALID_PARAMS, f"{unknown[0]}: unknown field", {"param": unknown[0]})


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


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
