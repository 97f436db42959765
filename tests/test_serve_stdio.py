"""The stdio bridge: `python -m apertus_mlx.serve --stdio` as a subprocess, driven by a small JSON-RPC client."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import apertus_mlx
from apertus_mlx import ChatSession, SamplingOptions

ROOT = Path(__file__).resolve().parents[1]
DEMO = "apertus_mlx/demo_model"
TIMEOUT = 60.0  # seconds any one answer may take on a slow, busy machine
QUESTION = "Hello! Who are you?"


class Client:
    """Speaks to one bridge process; a thread collects every stdout line, parsed, in order."""

    def __init__(self, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close()); shown when a wait fails
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apertus_mlx.serve", "--stdio", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.lines: list[bytes] = []  # everything on stdout, in order
        self.messages: list[dict[str, Any]] = []  # the same, parsed
        self._ids = itertools.count(1000)
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                try:
                    self.messages.append(json.loads(line))
                except ValueError:
                    self.messages.append({"not JSON": line.decode(errors="replace")})
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def send(self, message: dict[str, Any] | str) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: Any = None, id: Any = None) -> Any:
        """Send a request; returns its id."""
        id = next(self._ids) if id is None else id
        message = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return id

    def wait(self, predicate, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first message (in stdout order) that `predicate` accepts, waiting for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    self.stderr.seek(0)
                    log = self.stderr.read().decode(errors="replace")[-3000:]
                    raise AssertionError(
                        f"no such message {'before stdout closed' if self._eof else 'in time'}:\n{log}"
                    )
                self._changed.wait(min(left, 0.5))

    def response(self, id: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.wait(lambda m: m.get("id") == id and "method" not in m, timeout)

    def call(self, method: str, params: Any = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """A request and its response."""
        return self.response(self.request(method, params), timeout)

    def notifications(self, method: str, id: Any) -> list[dict[str, Any]]:
        with self._changed:
            return [m["params"] for m in self.messages if m.get("method") == method and m["params"]["id"] == id]

    def deltas(self, id: Any) -> str:
        """The streamed text of a chat, joined."""
        chunks = [n["chunk"] for n in self.notifications("chat.delta", id)]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    def close(self, timeout: float = TIMEOUT) -> int:
        """Close stdin and wait for the exit code."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)
            self.stderr.close()


def chat_params(text: str = QUESTION, max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens, **extra}


def assert_protocol_only(client: Client) -> None:
    """Every stdout line is one JSON-RPC 2.0 message: a response (id and result or error) or a notification."""
    assert client.lines and all(line.endswith(b"\n") for line in client.lines)
    for message in client.messages:
        assert message.get("jsonrpc") == "2.0", message
        assert ("method" in message and "params" in message) or (
            "id" in message and ("result" in message) ^ ("error" in message)
        )


@pytest.fixture(scope="module")
def bridge():
    client = Client("--model", DEMO)
    try:
        hello = client.call("initialize", {"protocolVersion": "1.0", "clientInfo": {"name": "pytest"}})["result"]
        assert hello["protocolVersion"] == "1.0"
        assert hello["serverInfo"] == {"name": "apertus-mlx", "version": apertus_mlx.__version__}
        assert {"chat", "complete", "cancel", "load", "models", "shutdown"} <= set(hello["capabilities"]["methods"])
        # Loading the model given by --model: a `load` of the same model waits for it instead of reloading.
        loaded = client.call("load", {"model": DEMO})["result"]["model"]
        assert loaded["status"] == "ready"
        yield client
    finally:
        client.close()


def test_models_lists_the_loaded_model(bridge):
    (model,) = bridge.call("models")["result"]["data"]
    assert model["id"] == "demo model" and model["status"] == "ready" and model["demo"] is True
    assert model["quantization"] == "BF16" and model["context_length"] == 65536


def test_chat_streams_deltas_and_equals_the_python_api(bridge):
    id = bridge.request("chat", chat_params())
    result = bridge.response(id)["result"]
    choice = result["choices"][0]
    assert result["object"] == "chat.completion" and choice["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 12
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 12
    assert bridge.deltas(id) == choice["message"]["content"]
    chunks = [n["chunk"] for n in bridge.notifications("chat.delta", id)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["id"] for c in chunks} == {result["id"]}
    # The same answer as the Python API, whose session has the template's default system prompt, as the pool's.
    model, tokenizer = apertus_mlx.load(ROOT / DEMO)
    session = ChatSession(model, tokenizer, options=SamplingOptions(temperature=0, max_tokens=12))
    assert choice["message"]["content"] == session.generate(QUESTION)


def test_two_chats_run_interleaved(bridge):
    a = bridge.request("chat", chat_params("Tell me about the Alps.", 40))
    b = bridge.request("chat", chat_params("Grüezi! Wie geht's?", 40))
    results = {id: bridge.response(id)["result"] for id in (a, b)}
    for id, result in results.items():
        assert result["choices"][0]["finish_reason"] == "length"
        assert bridge.deltas(id) == result["choices"][0]["message"]["content"]
    order = [
        m["params"]["id"] for m in bridge.messages if m.get("method") == "chat.delta" and m["params"]["id"] in (a, b)
    ]
    # Both stream at once: b's deltas start before a's end.
    assert order.index(b) < len(order) - 1 - order[::-1].index(a)


def test_cancel_ends_a_chat_promptly(bridge):
    id = bridge.request("chat", chat_params("Tell me a very long story.", 4000))
    bridge.wait(lambda m: m.get("method") == "chat.delta" and m["params"]["id"] == id and _content(m))
    sent = time.monotonic()
    assert bridge.call("cancel", {"id": id})["result"] == {"cancelled": True}
    result = bridge.response(id, timeout=10)["result"]
    assert time.monotonic() - sent < 5
    assert result["choices"][0]["finish_reason"] == "cancelled"
    assert 0 < result["usage"]["completion_tokens"] < 4000
    assert bridge.deltas(id) == result["choices"][0]["message"]["content"]
    assert bridge.notifications("chat.delta", id)[-1]["chunk"]["choices"][0]["finish_reason"] == "cancelled"
    # Nothing to cancel any more; the next chat runs as usual.
    assert bridge.call("cancel", {"id": id})["result"] == {"cancelled": False}
    assert bridge.call("chat", chat_params())["result"]["choices"][0]["finish_reason"] == "length"


def test_bad_lines_get_errors_and_the_bridge_goes_on(bridge):
    bridge.send("{not json")
    assert bridge.wait(lambda m: m.get("error", {}).get("code") == -32700)["id"] is None
    bridge.send({"jsonrpc": "1.0", "id": "old", "method": "models"})
    assert bridge.response("old")["error"]["code"] == -32600
    bridge.send([{"jsonrpc": "2.0", "id": "batch", "method": "models"}])
    assert (
        "batch"
        in bridge.wait(lambda m: m.get("error", {}).get("code") == -32600 and m["id"] is None)["error"]["message"]
    )
    assert bridge.call("nonsense")["error"]["code"] == -32601
    error = bridge.call("chat", {"messages": [{"role": "bot", "content": "hi"}]})["error"]
    assert error["code"] == -32602 and error["data"]["param"] == "messages[0].role"
    assert error["data"]["error"]["type"] == "invalid_request_error" and "unknown role" in error["message"]
    error = bridge.call("chat", {**chat_params(), "model": "gpt-4"})["error"]
    assert error["code"] == -32602 and error["data"]["error"]["code"] == "model_not_found"
    assert bridge.call("chat", chat_params(max_tokens=100_000))["error"]["data"]["param"] == "max_tokens"
    assert bridge.call("cancel", {})["error"]["code"] == -32602
    assert bridge.call("models")["result"]["data"][0]["status"] == "ready"


def test_complete_without_deltas(bridge):
    id = bridge.request("complete", {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 5, "stream": False})
    result = bridge.response(id)["result"]
    assert result["object"] == "text_completion" and result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5 and result["choices"][0]["text"]
    assert bridge.notifications("complete.delta", id) == []


def test_shutdown_exits_0_and_stdout_held_only_protocol(bridge):
    id = bridge.request("chat", chat_params(max_tokens=30))
    assert bridge.call("shutdown")["result"] is None
    assert bridge.response(id)["result"]["choices"][0]["finish_reason"] == "length"  # finished, not cancelled
    assert bridge.proc.wait(TIMEOUT) == 0
    assert_protocol_only(bridge)


def test_handshake_load_with_progress_and_eof():
    client = Client()  # no --model: nothing loads until `load`
    try:
        assert client.call("models")["error"]["code"] == -32002  # before initialize
        refused = client.call("initialize", {"protocolVersion": "2.0"})["error"]
        assert refused["code"] == -32005 and refused["data"] == {"protocolVersion": "1.0"}
        assert client.call("initialize", {"protocolVersion": "1.3"})["result"]["model"] is None
        assert client.call("initialize", {"protocolVersion": "1.0"})["error"]["code"] == -32600  # only once
        assert client.call("chat", chat_params())["error"]["code"] == -32001  # no model yet
        id = client.request("load", {"model": DEMO})
        assert client.response(id)["result"]["model"]["status"] == "ready"
        progress = client.notifications("progress", id)
        assert progress[0]["stage"] == "load" and progress[-1]["done"] == progress[-1]["total"] == 1
        # End of input cancels what runs and exits 0.
        chat = client.request("chat", chat_params("Tell me a very long story.", 4000))
        client.wait(lambda m: m.get("method") == "chat.delta" and m["params"]["id"] == chat)
        assert client.close() == 0
        assert client.response(chat, timeout=1)["result"]["choices"][0]["finish_reason"] == "cancelled"
        assert_protocol_only(client)
    finally:
        client.close()


def _content(message: dict[str, Any]) -> str:
    choices = message["params"]["chunk"]["choices"]
    return choices[0]["delta"].get("content", "") if choices else ""


def test_stray_output_goes_to_stderr():
    """fd 1 points at stderr while the bridge runs: a print (or a C library's write) cannot corrupt the protocol."""
    noisy = (
        "import os, sys\n"
        "from apertus_mlx.serve import stdio\n"
        "answer = stdio._QUICK['initialize']\n"
        "def initialize(bridge, params):\n"
        "    print('a stray print'); os.write(1, b'a stray write\\n')\n"
        "    return answer(bridge, params)\n"
        "stdio._QUICK['initialize'] = initialize\n"
        "sys.exit(stdio.run_stdio(None))\n"
    )
    hello = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "1.0"}})
    done = subprocess.run([sys.executable, "-c", noisy], input=f"{hello}\n", capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["result"]["protocolVersion"] == "1.0"
    assert "a stray print" in done.stderr and "a stray write" in done.stderr


def test_a_model_failing_mid_answer_is_a_server_error():
    from apertus_mlx import TurnError
    from apertus_mlx.serve.inflight import _response
    from apertus_mlx.serve.responses import ChatStream
    from apertus_mlx.serve.rpc import MODEL_ERROR, RpcError

    async def failing():
        yield apertus_mlx.TextDelta("Hel", "answer")
        raise TurnError.wrap(MemoryError("out of memory"))

    with pytest.raises(RpcError) as caught:
        asyncio.run(_response(ChatStream(failing(), "m", None, False)))
    assert caught.value.code == MODEL_ERROR and "MemoryError: out of memory" in caught.value.message
    assert caught.value.data["error"]["type"] == "server_error"
