"""`python -m tui` / `apertus-chat`: the terminal chat app."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apertus-chat", description="Chat with Apertus in the terminal, offline.")
    parser.add_argument("--model", help="model directory or Hugging Face repo id (remembered for next time)")
    parser.add_argument("--system-prompt", help="system prompt for new chats (remembered)")
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=None, help="deliberation on/off")
    args = parser.parse_args(argv)
    from .app import ChatApp
    from .store import StoreError

    try:
        app = ChatApp(model=args.model, system_prompt=args.system_prompt, think=args.think)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
