"""JSON-RPC 2.0 framing for the stdio bridge: one message per line, the error codes, the envelope's checks,
and the wire (a reader thread for stdin, writes to stdout under a lock)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from typing import IO, Any

from .errors import RequestError, first_line
from .threads import call_soon

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

NO_ID = object()  # the id of a notification (JSON-RPC tells one from a request by the missing key)

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

    @classmethod
    def internal(cls, e: Exception) -> RpcError:
        """A bug in the bridge, as the client sees it (the traceback goes to the log)."""
        return cls(INTERNAL_ERROR, f"internal error: {first_line(e)}")


class Malformed(Exception):
    """A line that is no request: `error` answers it, to `id` when one could be read (else null)."""

    def __init__(self, id: Any, error: RpcError):
        super().__init__(error.message)
        self.id, self.error = id, error


def parse(raw: bytes) -> tuple[Any, str, Any]:
    """(id or NO_ID, method, params) of one line; `Malformed` for anything else."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also bad UTF-8, too deep nesting, a number too long
        raise Malformed(None, RpcError(PARSE_ERROR, f"parse error: not valid JSON ({first_line(e)})")) from None
    try:
        return _envelope(message)
    except RpcError as e:
        id = message.get("id") if isinstance(message, dict) and valid_id(message.get("id")) else None
        raise Malformed(id, e) from None


def _envelope(message: Any) -> tuple[Any, str, Any]:
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "invalid request: batches are not supported; send one message per line")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: expected a JSON object")
    if message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    id = message.get("id", NO_ID)
    if id is not NO_ID and not valid_id(id):
        raise RpcError(INVALID_REQUEST, "invalid request: id must be a string or an integer")
    method = message.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string')
    return id, method, message.get("params", {})


def valid_id(id: Any) -> bool:
    return isinstance(id, str) or (isinstance(id, int) and not isinstance(id, bool))


def known(params: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a field the method does not take (a typo would otherwise be silently ignored)."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RpcError(INVALID_PARAMS, f"{unknown[0]}: unknown field", {"param": unknown[0]})


class Wire:
    """The two streams: lines read from stdin on a thread, and JSON objects written to stdout, one per line.

    Writes happen on the loop's thread (progress from a load comes through `call_soon`); the lock keeps each
    line whole should a thread ever write. A closed stdout reads as the end of input: either way the client
    is gone.
    """

    def __init__(self, out: IO[bytes]):
        self.out = out
        self._lock = threading.Lock()
        self._broken = False
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def start_reading(self, fd: int) -> None:
        threading.Thread(target=self._read, args=(fd,), name="stdio-reader", daemon=True).start()

    async def line(self) -> bytes | None:
        """The next line read; None at the end of input."""
        return await self._lines.get()

    def result(self, id: Any, result: Any) -> None:
        self._write({"id": id, "result": result})

    def error(self, id: Any, error: RpcError) -> None:
        self._write({"id": id, "error": error.to_dict()})

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._write({"method": method, "params": params})

    def _write(self, message: dict[str, Any]) -> None:
        line = json.dumps({"jsonrpc": "2.0", **message}, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self.out.write(line.encode("utf-8"))
                self.out.flush()
            except (ValueError, OSError) as e:  # the client stopped reading (a broken pipe): as if it left
                if not self._broken:
                    self._broken = True
                    log.info("stdout closed (%s): ending", type(e).__name__)
                    self._post(None)

    def _read(self, fd: int) -> None:
        """Raw reads (no buffered object's lock is held at exit), split into lines."""
        rest = b""
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                if rest.strip():
                    self._post(rest)
                self._post(None)
                return
            rest += data
            *lines, rest = rest.split(b"\n")
            for line in lines:
                self._post(line)

    def _post(self, line: bytes | None) -> None:
        call_soon(self._loop, self._lines.put_nowait, line)
