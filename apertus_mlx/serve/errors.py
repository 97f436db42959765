"""Request errors in OpenAI's shape: an HTTP status, a one-line message, and the parameter at fault."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server will not run. `to_dict()` is OpenAI's error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> RequestError:
    """A 400 naming `param`: "`param`: message"."""
    return RequestError(f"{param}: {message}", param=param)


def model_failed(error: BaseException) -> RequestError:
    """The model failed mid-answer (out of memory, a bug): a server error; the server goes on."""
    return RequestError(first_line(error), status=500, kind="server_error")


def first_line(error: BaseException) -> str:
    """An exception as one line of a message: its first line, or its type's name when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
