"""Errors raised for bad input; each message is one line that names the file, key or tensor at fault."""


class ApertusError(Exception):
    """Base class: the CLIs print these as `error: <message>` and exit non-zero, without a traceback."""


class ConfigError(ApertusError, ValueError):
    """`config.json` (or another settings file) is missing a key or asks for something unsupported."""


class CheckpointError(ApertusError, ValueError):
    """A weight file is missing, truncated, or holds tensors that do not fit the model."""


class ModelNotFoundError(ApertusError, FileNotFoundError):
    """A model path does not exist, or a repo id cannot be resolved (offline or unknown)."""
