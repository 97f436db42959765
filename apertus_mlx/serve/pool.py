"""A bounded pool of chats kept with their KV caches, so a client resending a growing conversation
pays only for its new tokens.

A request leases the idle chat whose history shares the longest prefix with its own messages; the
chat's history is then replaced by the request's, and the engine reuses the longest common token
prefix of the KV cache (whatever is past it is dropped). A reused chat therefore never shows one
client another's conversation: only the prompt decides the output.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import RequestError

if TYPE_CHECKING:
    from apertus_mlx import ChatSession, Engine


class SessionPool:
    """At most `size` idle chats are kept; at most `max_active` requests run (or wait) at once."""

    def __init__(self, engine: Engine, size: int = 8, max_active: int = 64):
        self.engine, self.size, self.max_active = engine, size, max_active
        self._idle: list[ChatSession] = []  # least recently used first
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def lease(
        self,
        messages: list[dict[str, Any]],
        system: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        think: bool = False,
    ) -> Lease:
        """A chat holding `messages` (ready for `astream(chat)`); `release()` gives it back to the pool."""
        with self._lock:
            if self._active >= self.max_active:
                raise RequestError(
                    f"the server is busy: {self._active} requests are running or queued; retry shortly",
                    status=429,
                    kind="rate_limit_error",
                    code="queue_full",
                )
            self._active += 1
            session = self._take(messages, system)
        try:
            if session is None:
                session = self.engine.session(system=system)
            session.system = system if system is not None else session.format.default_system()
            session.messages = [dict(m) for m in messages]
            session.tools, session.think = tools, think
        except BaseException:
            self._give_back(None)
            raise
        return Lease(self, session)

    def _give_back(self, session: ChatSession | None) -> None:
        with self._lock:
            self._active -= 1
            if session is not None and not session.busy:  # a chat still busy (client gone) is not reused
                self._idle.append(session)
                del self._idle[: -self.size]  # forget the least recently used beyond the bound

    def _take(self, messages: list[dict[str, Any]], system: str | None) -> ChatSession | None:
        """The idle chat to reuse (removed from the pool), or None to make a new one."""
        if not self._idle:
            return None
        scores = [(*_shared(s, messages, system), -i) for i, s in enumerate(self._idle)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        if scores[best][0] == 0 and len(self._idle) < self.size:
            return None  # nothing in common: keep the pool's chats for the clients they belong to
        return self._idle.pop(best)


def _shared(session: ChatSession, messages: list[dict[str, Any]], system: str | None) -> tuple[int, bool]:
    """How many leading messages a chat shares with a request, and whether its system prompt is the same."""
    same_system = system is None or session.system == system
    n = 0
    if same_system:
        for mine, theirs in zip(session.messages, messages, strict=False):
            if mine.get("role") != theirs.get("role") or mine.get("content") != theirs.get("content"):
                break
            n += 1
    return n, same_system


class Lease:
    """A chat lent to one request. `release()` may be called any number of times; the first one counts."""

    def __init__(self, pool: SessionPool, session: ChatSession):
        self.pool, self.session = pool, session
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._give_back(self.session)

    def __enter__(self) -> ChatSession:
        return self.session

    def __exit__(self, *exc: Any) -> None:
        self.release()
