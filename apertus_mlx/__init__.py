"""apertus-mlx: the Swiss AI Apertus language models on Apple silicon with MLX."""

import sys
import types

from .engine import Engine
from .errors import (
    ApertusError,
    CheckpointError,
    ConfigError,
    EngineClosedError,
    ModelNotFoundError,
    ResponseFormatError,
    TurnError,
)
from .events import Done, Event, PrefillProgress, Stats, TextDelta, TokenLogprobs, ToolCall, ToolCallError
from .load import load, load_model, load_tokenizer, make_cache, resolve
from .model import Model, ModelArgs
from .save import save_model
from .session import ChatSession, SamplingOptions, generate

__version__ = "0.1.0"

__all__ = [
    "ApertusError",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "Done",
    "Engine",
    "EngineClosedError",
    "Event",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "PrefillProgress",
    "ResponseFormatError",
    "SamplingOptions",
    "Stats",
    "TextDelta",
    "TokenLogprobs",
    "ToolCall",
    "ToolCallError",
    "TurnError",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "make_cache",
    "resolve",
    "save_model",
]


class _Package(types.ModuleType):
    """`apertus_mlx.generate` is the one-shot function, and `python -m apertus_mlx.generate` the CLI module.

    Importing a submodule binds it as an attribute of its package, so `import apertus_mlx.generate` (or
    `from apertus_mlx.generate import main`) would replace the function with the module; the import system
    tolerates a package that declines the binding, and the module stays reachable in `sys.modules`.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
