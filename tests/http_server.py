"""A real server on a free loopback port, in a thread: for tests that use HTTP clients against it."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from apertus_mlx import Engine
from apertus_mlx.serve.http import ServerConfig, create_app


class RunningServer:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, config)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()
