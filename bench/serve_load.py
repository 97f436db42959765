"""A bounded load test of the OpenAI-compatible server (`python -m apertus_mlx.serve`) on loopback.

    python -m bench.serve_load --model apertus_mlx/demo_model
    python -m bench.serve_load --model bench/yardstick/models/small --requests 48 --clients 1,4,8
    python -m bench.serve_load --shape 8b --bits 4             # random weights in the Apertus-8B shape, INT4 g64
    python -m bench.serve_load --url http://127.0.0.1:8080 --pid 1234   # a server that is already running

Unless `--url` is given, the server is started here in a child process on a free loopback port, so its
memory can be read: the resident set size (RSS) of that process, through psutil when it is installed,
else /proc/PID/status, else `ps` (the JSON says which). With `--url`, RSS is read only for `--pid`.
Where nvidia-smi lists the server's process, its GPU memory is reported too (not checked).

Every request is a streamed chat completion (SSE) with `stream_options.include_usage`, temperature 0 and a
fixed `max_tokens`, cycling through a handful of short prompts in several languages. Time to first token
is the time from sending the request to the first chunk carrying text; latency is the time to
`data: [DONE]`. Each phase sends `--requests` requests: from one client one after the other, then from C
concurrent clients (threads, one keep-alive connection each) sending N/C requests each. The phases run
twice: first as a warm-up (`--warmup-requests` each, default as many), which fills the server's pool of
cached chats and MLX's buffer cache for every batch size, then measured. Per phase: requests, errors by
kind, latency p50/p90/p99, TTFT p50/p90, aggregate completion tokens/s (`usage.completion_tokens` summed
over the phase's wall time), and the server's RSS before and after (read once `/health` reports no
active request).

Prints a Markdown table, writes JSON with `--out`, and exits with status 1 if any request failed, if the
server still counted active requests after a phase, or if the server's RSS at the end exceeds its RSS
after the warm-up by more than `--max-rss-growth-mb` (default 128 MB).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROMPTS = (
    "Grüezi! Was ist die Hauptstadt der Schweiz?",
    "Explique en deux phrases pourquoi le ciel est bleu.",
    "Scrivi una breve poesia sulle Alpi.",
    "Co ei la capitala dil Grischun?",  # Romansh
    "Give me three tips for writing clear documentation.",
    "¿Cuántos idiomas oficiales tiene Suiza?",
)
MB = 1024 * 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- one request ----------------------------------------------------------------------------------------


@dataclass
class Result:
    """One streamed chat completion as the client saw it (perf_counter seconds)."""

    start: float
    end: float
    error: str | None = None  # None when it succeeded; else e.g. "http 500", "stream error", "timeout"
    ttft: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""


class Client:
    """One client: a keep-alive HTTP connection, reopened after any failure."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def chat(self, prompt: str, max_tokens: int) -> Result:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        try:
            result = self._send(json.dumps(body).encode(), start)
        except TimeoutError:
            result = Result(start, time.perf_counter(), "timeout")
        except (OSError, http.client.HTTPException) as e:
            result = Result(start, time.perf_counter(), f"connection: {type(e).__name__}")
        if result.error is not None:
            self.close()  # start afresh: the connection may be in any state
        return result

    def _send(self, body: bytes, start: float) -> Result:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self.conn.request("POST", f"{self.prefix}/v1/chat/completions", body=body, headers=self.headers)
        response = self.conn.getresponse()
        if response.status != 200:
            response.read()
            return Result(start, time.perf_counter(), f"http {response.status}")
        result = Result(start, 0.0)
        text, done, usage = [], False, None
        for raw in response:  # SSE: `data: {...}` lines, then `data: [DONE]`; read to the end (keep-alive)
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = "stream error"
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if piece and result.ttft is None:
                    result.ttft = time.perf_counter() - start
                text.append(piece)
        result.end = time.perf_counter()
        result.text = "".join(text)
        if result.error is None and not done:
            result.error = "no [DONE]"
        elif result.error is None and usage is None:
            result.error = "no usage"
        if usage is not None:
            result.completion_tokens = usage.get("completion_tokens", 0)
            result.prompt_tokens = usage.get("prompt_tokens", 0)
        return result


def health(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """`/health`'s JSON body (whatever its status), or None when the server cannot be reached."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", f"{parts.path.rstrip('/')}/health")
        return json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


# ---- the server's memory ----------------------------------------------------------------------------------


def rss_source() -> str:
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        pass
    if Path("/proc/self/status").exists():
        return "/proc/PID/status"
    return "ps"


def rss_mb(pid: int, source: str) -> float | None:
    """The resident set size of process `pid` in MiB, or None if it cannot be read."""
    try:
        if source == "psutil":
            import psutil

            return psutil.Process(pid).memory_info().rss / MB
        if source == "/proc/PID/status":
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
            return None
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip()) / 1024 if out.stdout.strip() else None
    except Exception:
        return None


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak RSS so far (Linux only)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def gpu_mb(pid: int) -> float | None:
    """GPU memory nvidia-smi attributes to `pid`, if it lists it (not inside every container)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


class Memory:
    """Reads the server process's memory, or nothing when its pid is unknown."""

    def __init__(self, pid: int | None):
        self.pid, self.source = pid, rss_source() if pid else None

    def snapshot(self) -> dict[str, float | None]:
        if self.pid is None:
            return {"rss_mb": None, "gpu_mb": None}
        return {"rss_mb": rss_mb(self.pid, self.source), "gpu_mb": gpu_mb(self.pid)}


# ---- the server as a child process ------------------------------------------------------------------------


class ChildServer:
    """`python -m apertus_mlx.serve` on a free loopback port; its output goes to a log file."""

    def __init__(self, model: str, max_tokens: int, start_timeout: float, api_key: str | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix="serve-load-", suffix=".log")[1])
        argv = [sys.executable, "-m", "apertus_mlx.serve", "--model", model, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--max-tokens", str(max(max_tokens, 16))]
        if api_key:
            argv += ["--api-key", api_key]
        log(f"starting the server: {' '.join(argv[1:])}")
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while (state := health(self.url, timeout=2)) is None or state.get("status") != "ok":
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready after {start_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.pid = self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """Ask the server to stop (SIGTERM), kill it after 30 s; its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# ---- phases ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_clients(
    url: str, api_key: str | None, clients: int, requests: int, max_tokens: int, timeout: float, label: str
) -> list[Result]:
    """`requests` requests from `clients` threads (request i from client i % clients), started together."""
    jobs: list[list[int]] = [list(range(c, requests, clients)) for c in range(clients)]
    results: list[Result | None] = [None] * requests
    barrier = threading.Barrier(clients)
    finished = [0]
    lock = threading.Lock()

    def work(mine: list[int]) -> None:
        client = Client(url, api_key, timeout)
        barrier.wait()
        try:
            for i in mine:
                results[i] = client.chat(PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    finished[0] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(mine,), daemon=True) for mine in jobs]
    for t in threads:
        t.start()
    last = time.monotonic()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
            if time.monotonic() - last < 10:
                continue
            last = time.monotonic()
            errors = sum(r is not None and r.error is not None for r in results)
            log(f"  {label}: {finished[0]}/{requests} done, {errors} errors")
    return [r for r in results if r is not None]


def wait_idle(url: str, timeout: float = 30.0) -> int | None:
    """Wait until `/health` reports no active request; the last count seen (None: no answer)."""
    deadline = time.monotonic() + timeout
    while True:
        state = health(url)
        active = state.get("active_requests") if state else None
        if active == 0 or time.monotonic() > deadline:
            return active
        time.sleep(0.1)


def summarize(name: str, clients: int, results: list[Result], requested: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    if len(results) < requested:
        errors["not sent"] += requested - len(results)
    wall = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    tokens = sum(r.completion_tokens for r in ok)
    latencies = [r.end - r.start for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    answers: dict[str, set[str]] = {}
    for i, r in enumerate(results):
        if r.error is None:
            answers.setdefault(PROMPTS[i % len(PROMPTS)], set()).add(r.text)
    return {
        "phase": name,
        "clients": clients,
        "requests": requested,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)},
        "ttft_s": {f"p{q}": percentile(ttfts, q) for q in (50, 90)},
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        # temperature 0: how many different answers each prompt got in this phase (1 unless batching changes them)
        "distinct_answers_per_prompt": max((len(v) for v in answers.values()), default=0),
    }


def run(args: argparse.Namespace, url: str, memory: Memory) -> dict[str, Any]:
    warm = args.warmup_requests if args.warmup_requests is not None else args.requests
    phases: list[dict[str, Any]] = []
    base: dict[str, float | None] = {}
    for warmup in (True, False):  # the warm-up is one pass of the same phases: pools and caches fill up first
        for clients in args.clients:
            name = ("warm-up, " if warmup else "") + ("sequential" if clients == 1 else f"{clients} concurrent")
            requests = max(warm, clients) if warmup else args.requests
            before = memory.snapshot()
            log(f"{name}: {requests} requests from {clients} client{'s' if clients > 1 else ''}")
            results = run_clients(url, args.api_key, clients, requests, args.max_tokens, args.timeout, name)
            active = wait_idle(url)
            phase = {**summarize(name, clients, results, requests), "warmup": warmup, "active_after": active}
            phases.append({**phase, "memory_before": before, "memory_after": memory.snapshot()})
            log(_line(phases[-1]))
        base = base or phases[-1]["memory_after"]
    final = phases[-1]["memory_after"]
    growth = None
    if base["rss_mb"] is not None and final["rss_mb"] is not None:
        growth = final["rss_mb"] - base["rss_mb"]
    failures = [f"{p['phase']}: {p['errors']} failed requests {p['errors_by_kind']}" for p in phases if p["errors"]]
    failures += [
        f"{p['phase']}: /health still counts {p['active_after']} active requests" for p in phases if p["active_after"]
    ]
    if growth is not None and growth > args.max_rss_growth_mb:
        failures.append(f"the server's RSS grew {growth:.0f} MB after the warm-up (limit {args.max_rss_growth_mb} MB)")
    return {
        "settings": {
            "requests_per_phase": args.requests,
            "clients": args.clients,
            "warmup_requests_per_phase": warm,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "prompts": list(PROMPTS),
            "max_rss_growth_mb": args.max_rss_growth_mb,
        },
        "phases": phases,
        "memory": {
            "source": memory.source,
            "pid": memory.pid,
            "rss_after_warmup_mb": base["rss_mb"],
            "rss_final_mb": final["rss_mb"],
            "rss_growth_mb": growth,
            "rss_peak_mb": peak_rss_mb(memory.pid) if memory.pid else None,
            "gpu_after_warmup_mb": base["gpu_mb"],
            "gpu_final_mb": final["gpu_mb"],
        },
        "failures": failures,
        "passed": not failures,
    }


def _line(p: dict[str, Any]) -> str:
    rss = p["memory_after"]["rss_mb"]
    return (
        f"{p['phase']}: {p['ok']}/{p['requests']} ok, {p['errors']} errors, latency p50 {_s(p['latency_s']['p50'])} s, "
        f"TTFT p50 {_s(p['ttft_s']['p50'])} s, {p['tokens_per_s']:.1f} tok/s, RSS {_mb(rss)} MB"
    )


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The phases as a Markdown table, and a line on memory."""
    lines = [
        "| phase | clients | requests | errors | latency p50 / p90 / p99 (s) | TTFT p50 / p90 (s) "
        "| completion tok/s | server RSS before → after (MB) |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for p in result["phases"]:
        lat, ttft = p["latency_s"], p["ttft_s"]
        errors = str(p["errors"]) + (
            f" ({', '.join(f'{k}: {v}' for k, v in p['errors_by_kind'].items())})" if p["errors"] else ""
        )
        rss = f"{_mb(p['memory_before']['rss_mb'])} → {_mb(p['memory_after']['rss_mb'])}"
        lines.append(
            f"| {p['phase']} | {p['clients']} | {p['requests']} | {errors} "
            f"| {_s(lat['p50'])} / {_s(lat['p90'])} / {_s(lat['p99'])} | {_s(ttft['p50'])} / {_s(ttft['p90'])} "
            f"| {p['tokens_per_s']:.1f} | {rss} |"
        )
    m = result["memory"]
    if m["rss_growth_mb"] is not None:
        memory = (
            f"Server RSS ({m['source']}): {_mb(m['rss_after_warmup_mb'])} MB after the warm-up, "
            f"{_mb(m['rss_final_mb'])} MB at the end: {m['rss_growth_mb']:+.0f} MB "
            f"(limit +{result['settings']['max_rss_growth_mb']:g} MB); peak {_mb(m['rss_peak_mb'])} MB."
        )
        if m["gpu_final_mb"] is not None:
            memory += f" GPU memory (nvidia-smi): {_mb(m['gpu_after_warmup_mb'])} → {_mb(m['gpu_final_mb'])} MB."
    else:
        memory = "Server memory not measured (no pid: pass --pid with --url)."
    verdict = "passed" if result["passed"] else "FAILED: " + "; ".join(result["failures"])
    return "\n".join([*lines, "", memory, f"Result: {verdict}."])


# ---- command line ----------------------------------------------------------------------------------------


def random_checkpoint(args: argparse.Namespace, workdir: Path) -> Path:
    """Random weights of a published shape (bench/shapes.py), quantized with `--bits`, saved under `workdir`."""
    import mlx.nn as nn

    from .shapes import random_model, save_layer_by_layer

    model, config = random_model(args.shape)
    if args.bits:
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
    return save_layer_by_layer(model, config, workdir / f"{args.shape}-{args.bits or 'bf16'}")


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model directory or repo id for the server this starts")
    what.add_argument("--shape", choices=("8b", "1b", "tiny"), help="random weights of this shape (bench/shapes.py)")
    what.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8080) instead of starting one")
    p.add_argument("--bits", type=int, default=None, help="with --shape: quantize to this many bits (group 64)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, to read its memory")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (and given to the server)")
    p.add_argument("--requests", type=int, default=48, help="requests per phase (default 48)")
    p.add_argument("--clients", type=_ints, default=[1, 4, 8], help="client counts, one phase each (default 1,4,8)")
    p.add_argument("--warmup-requests", type=int, default=None, help="requests per warm-up phase (default: --requests)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--max-rss-growth-mb", type=float, default=128.0, help="allowed RSS growth after the warm-up")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take (default 300)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds the server may take to load")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    total = (args.requests + (args.warmup_requests or args.requests)) * len(args.clients)
    if args.requests > 512 or total > 2048:
        raise SystemExit("error: a bounded run: at most 512 requests per phase and 2048 in all")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model = args.model
        if args.shape:
            log(f"making random weights of shape {args.shape} ({args.bits or 16} bits)")
            model = str(random_checkpoint(args, Path(tmp)))
        server = None
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            server = ChildServer(model, args.max_tokens, args.start_timeout, args.api_key)
            url, pid = server.url, server.pid
        try:
            state = health(url) or {}
            memory = Memory(pid)
            log(f"server {url} ready: model {state.get('model')!r}, RSS {_mb(memory.snapshot()['rss_mb'])} MB")
            result = run(args, url, memory)
        finally:
            status = server.stop() if server is not None else None
    result = {
        "model": state.get("model"),
        "model_path": model or args.url,
        "shape": args.shape,
        "bits": args.bits,
        "url": url if server is None else "started here on a free loopback port",
        "server_exit_status": status,  # uvicorn re-raises the SIGTERM it handled: -15 after a clean stop
        "server_log_tail": server.log_tail(5).splitlines() if server is not None else None,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        **result,
    }
    print(markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for failure in result["failures"]:
        log(f"error: {failure}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
