"""apertus-mlx: the Swiss AI Apertus language models on Apple silicon with MLX."""

from .engine import Engine
from .errors import ApertusError, CheckpointError, ConfigError, ModelNotFoundError
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
    "Event",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "PrefillProgress",
    "SamplingOptions",
    "Stats",
    "TextDelta",
    "TokenLogprobs",
    "ToolCall",
    "ToolCallError",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "make_cache",
    "resolve",
    "save_model",
]
