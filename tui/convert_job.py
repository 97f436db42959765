"""Run `python -m apertus_mlx.convert` as a child process and follow its JSON progress, for the app.

The conversion runs in its own process so the app stays responsive and MLX never runs in the UI's. The
converter writes its output directory atomically and unwinds on SIGTERM, so a cancelled job leaves
nothing half-written behind (any leftover temporary directory is removed here as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any


class ConversionError(Exception):
    """The converter failed; the message is its one-line `error: …` (without the prefix)."""


class ConvertJob:
    """One conversion: `async for record in job.run()` yields the converter's JSON records.

    Records are `{"type": "progress", "stage", "done", "total", "unit", "description"}` and, last,
    `{"type": "done", "out", "bits_per_weight", "size_bytes", …}`. A failure raises `ConversionError`.
    `cancel()` terminates the converter and ends the iteration quietly (`cancelled` is then True);
    cancelling the task that iterates terminates it too.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        ram_gb: float,
        out: str | os.PathLike,
        *,
        recipe: str = "budget",
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
    ):
        self.source = str(source)
        self.ram_gb = ram_gb
        self.out = Path(out)
        self.recipe = recipe
        self.extra_args = tuple(extra_args)
        self.python = python
        self.stderr_lines: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._cancelled = False

    @property
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "apertus_mlx.convert",
            "--model",
            self.source,
            "--recipe",
            self.recipe,
            "--ram-gb",
            f"{self.ram_gb:g}",
            "--out",
            str(self.out),
            "--progress",
            "json",
            *self.extra_args,
        ]

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def run(self) -> AsyncIterator[dict[str, Any]]:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._process = process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        stderr_task = asyncio.create_task(self._read_stderr(process))
        try:
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("{"):
                    continue  # not ours: a library printing to stdout
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
            status = await process.wait()
            await stderr_task
            if self._cancelled:
                return  # the iteration just ends; `cancelled` says why
            if status != 0:
                raise ConversionError(self._error_message(status))
        finally:
            if process.returncode is None:
                await self._stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stderr_task, 5)  # the pipe closes with the process
            for _ in range(3):  # let the transport's close callbacks run before anyone closes the loop
                await asyncio.sleep(0)
            self._remove_partial_output()

    async def cancel(self) -> None:
        """Stop the converter (SIGTERM, then SIGKILL after a grace period); its partial output is removed."""
        self._cancelled = True
        await self._stop()

    async def _stop(self, grace: float = 10.0) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip())

    def _error_message(self, status: int) -> str:
        for line in reversed(self.stderr_lines):
            if line.startswith("error: "):
                return line[len("error: ") :]
        last = next((line for line in reversed(self.stderr_lines) if line.strip()), "")
        return f"the converter exited with status {status}" + (f": {last.strip()}" if last else "")

    def _remove_partial_output(self) -> None:
        # save_model writes into `.<name>.partial-*` beside the output; a killed converter may leave one.
        if self.out.parent.is_dir():
            for leftover in self.out.parent.glob(f".{self.out.name}.partial-*"):
                shutil.rmtree(leftover, ignore_errors=True)


def _child_env() -> dict[str, str]:
    """The environment for the converter: ours, with this project importable even when not installed."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("apertus_mlx")  # found without importing it (and MLX) here
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
