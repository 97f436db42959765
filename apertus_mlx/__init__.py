"""apertus-mlx: the Swiss AI Apertus language models on Apple silicon with MLX."""

from .errors import ApertusError, CheckpointError, ConfigError, ModelNotFoundError
from .load import load, load_model, load_tokenizer, make_cache, resolve
from .model import Model, ModelArgs
from .save import save_model

__version__ = "0.1.0"

__all__ = [
    "ApertusError",
    "CheckpointError",
    "ConfigError",
    "Model",
    "ModelArgs",
    "ModelNotFoundError",
    "load",
    "load_model",
    "load_tokenizer",
    "make_cache",
    "resolve",
    "save_model",
]
