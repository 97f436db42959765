"""Errors raised for bad input; each message is one line that names the file, key or tensor at fault."""

from __future__ import annotations


class ApertusError(Exception):
    """Base class: the CLIs print these as `error: <message>` and exit non-zero, without a traceback."""


class ConfigError(ApertusError, ValueError):
    """`config.json` (or another settings file) is missing a key or asks for something unsupported."""


class CheckpointError(ApertusError, ValueError):
    """A weight file is missing, truncated, or holds tensors that do not fit the model."""


class ResponseFormatError(ApertusError, ValueError):
    """A `response_format` that is not one OpenAI accepts, or whose JSON schema cannot be enforced."""


class ModelNotFoundError(ApertusError, FileNotFoundError):
    """A model path does not exist, or a repo id cannot be resolved (offline or unknown)."""


class TurnError(ApertusError):
    """A turn failed while the model ran (out of memory, a bug); the chat is left as it was before it.

    The original exception is chained as `__cause__`.
    """

    @classmethod
    def wrap(cls, error: BaseException) -> TurnError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        wrapped = cls(f"the turn failed: {type(error).__name__}{': ' + first if first else ''}")
        wrapped.__cause__ = error
        return wrapped


class EngineClosedError(ApertusError):
    """The engine was closed: it takes no more work."""
