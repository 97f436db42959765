"""`python -m apertus_mlx.serve`: an OpenAI-compatible local server, or (`--stdio`) JSON-RPC over stdin/stdout."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .requests import Limits

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apertus_mlx.serve", description=__doc__)
    p.add_argument("--model", help="model directory or Hugging Face repo id (default: as the CLI chooses)")
    p.add_argument("--stdio", action="store_true", help="speak JSON-RPC 2.0 over stdin/stdout instead of HTTP")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this Mac only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("APERTUS_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser requests from this origin")
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MB (default 4)")
    p.add_argument("--max-requests", type=int, default=64, help="requests running or queued at once (default 64)")
    p.add_argument("--pool-size", type=int, default=8, help="conversations kept with their KV caches (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from apertus_mlx import ApertusError, Engine

    if args.stdio:
        from .stdio import run_stdio

        limits = Limits(max_tokens=args.max_tokens)
        return run_stdio(args.model, pool_size=args.pool_size, limits=limits, max_active=args.max_requests)

    import uvicorn

    from .http import ServerConfig, create_app

    if not _is_loopback(args.host):
        exposure = "with an API key" if args.api_key else "WITHOUT an API key: anyone who can reach it can use it"
        print(f"warning: listening on {args.host}, reachable from other machines, {exposure}", file=sys.stderr)
    engine = Engine(args.model)
    try:
        engine.wait_ready()
    except ApertusError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if engine.note:
        print(engine.note, file=sys.stderr)
    for line in engine.import_summary:
        print(line, file=sys.stderr)
    config = ServerConfig(
        api_key=args.api_key,
        limits=Limits(max_tokens=args.max_tokens),
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        pool_size=args.pool_size,
        max_active=args.max_requests,
        cors_origins=tuple(args.cors_origin),
    )
    try:
        uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
