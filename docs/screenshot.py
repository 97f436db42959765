"""Make `docs/tui.svg`: the chat app's own screenshot of a real answer from the bundled demo model.

Run with `make screenshot`. It drives the app as a person would (type, Enter, wait for the answer) in a
headless terminal of 110x32 and saves what Textual draws, in a throwaway data folder.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

QUESTION = "How do I install a package with apt?"


async def main(out: Path) -> None:
    os.environ["APERTUS_CHAT_HOME"] = tempfile.mkdtemp(prefix="apertus-chat-")
    from apertus_mlx.load import DEMO_MODEL
    from tui.app import ChatApp
    from tui.store import ChatStore

    store = ChatStore(Path(os.environ["APERTUS_CHAT_HOME"]) / "chats.sqlite")
    store.save_settings({"temperature": 0.0, "max_tokens": 120})
    store.close()
    app = ChatApp(model=str(DEMO_MODEL))
    async with app.run_test(size=(110, 32)) as pilot:
        while app.chat.conversation is None or app.chat.query_one("#prompt").read_only:
            await pilot.pause(0.1)
        await pilot.press(*QUESTION, "enter")
        while not app.chat.answers:
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        app.save_screenshot(filename=out.name, path=str(out.parent))
        await app.action_quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/tui.svg").resolve()))
