"""The installed `apertus-chat` in a real pseudo-terminal: it starts, answers, and quits cleanly."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest

import apertus_mlx
from apertus_mlx.load import DEMO_MODEL
from tui.store import ChatStore

COLUMNS, LINES = 110, 32


class Terminal:
    """The app's screen as a person would read it: pexpect feeds its output to a pyte terminal emulator."""

    def __init__(self, command: str, args: list[str], env: dict[str, str]):
        self.screen = pyte.Screen(COLUMNS, LINES)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.child = pexpect.spawn(command, args, env=env, dimensions=(LINES, COLUMNS), timeout=5)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, needle: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never appeared; the screen:\n{self.text()}")
            self.read(0.2)
        return self.text()

    def read(self, timeout: float) -> None:
        try:
            data = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return
        self.raw += data
        self.stream.feed(data)


def test_the_console_script_answers_and_quits_cleanly(tmp_path):
    script = shutil.which("apertus-chat", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("apertus-chat is not installed next to this Python; run `make setup`")
    store = ChatStore(tmp_path / "chats.sqlite")
    store.save_settings({"temperature": 0.0, "max_tokens": 16})
    store.close()
    model, tokenizer = apertus_mlx.load(DEMO_MODEL)
    expected = apertus_mlx.generate(model, tokenizer, "Hello there", temperature=0.0, max_tokens=16)
    first_line = next(line.strip() for line in expected.splitlines() if line.strip())

    env = {**os.environ, "APERTUS_CHAT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    term = Terminal(script, ["--model", str(DEMO_MODEL)], env)
    try:
        term.wait_for("Message Apertus")  # the model is loaded and the message box is enabled
        assert "demo model" in term.text()
        term.child.send("Hello there")
        term.wait_for("Hello there")
        term.child.send("\r")
        screen = term.wait_for("16 tokens")  # the answer's footer: it has ended
        assert first_line[:30] in screen
        term.child.send("\x11")  # Ctrl+Q
        term.child.expect(pexpect.EOF, timeout=30)
        term.raw += term.child.before or b""
    finally:
        term.child.close(force=True)
    assert term.child.exitstatus == 0, term.raw[-2000:]
    assert b"\x1b[?1049l" in term.raw  # the terminal's normal screen is back
    assert ChatStore(tmp_path / "chats.sqlite").chats()[0].messages[-1]["content"] == expected
