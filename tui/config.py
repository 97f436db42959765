"""Where the app keeps its files, its remembered settings, and the user's key bindings."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP_NAME = "apertus-mlx"
# The app's default model: small enough to download in about a minute and to fit any Apple-silicon Mac;
# Ctrl+O offers the bigger ones. Its id is one of the checked ids in `catalog.PUBLISHED` (tested).
DEFAULT_CHAT_MODEL = "swiss-ai/Apertus-v1.1-1.5B-Instruct-MLX-INT4"
HOME_ENV = "APERTUS_CHAT_HOME"  # one folder for data and config instead of the platform's (tests, portable use)


def data_dir() -> Path:
    """The chats database and KV caches: the platform's user data directory (or `$APERTUS_CHAT_HOME`)."""
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else Path(platformdirs.user_data_dir(APP_NAME))


def config_file() -> Path:
    """The user's config file (`[keys]` bindings, `[export] dir`)."""
    home = os.environ.get(HOME_ENV)
    return (Path(home) if home else Path(platformdirs.user_config_dir(APP_NAME))) / "tui.toml"


@dataclass(frozen=True)
class Settings:
    """What the settings screen edits; remembered across restarts in the chats database."""

    system_prompt: str = ""  # empty: the chat template's own, with today's date
    think: bool = False
    temperature: float = 0.8  # Apertus's recommended sampling
    top_p: float = 0.9
    max_tokens: int = 1024
    model: str = ""  # empty: `--model`, `$APERTUS_MODEL`, then the default (offline: the demo model)
    theme: str = "textual-dark"

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> Settings:
        """Settings from stored values; unknown keys and values of the wrong type are ignored."""
        default = cls()
        kept = {}
        for f in fields(cls):
            value = values.get(f.name)
            expected = type(getattr(default, f.name))
            if isinstance(value, expected) or (expected is float and type(value) is int):
                kept[f.name] = expected(value)
        return replace(default, **kept)

    def to_stored(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Raise `ValueError` naming the first setting out of range."""
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_tokens <= 65536:
            raise ValueError(f"max tokens must be between 1 and 65536, got {self.max_tokens}")


@dataclass(frozen=True)
class UserConfig:
    """The config file: key bindings by action id, and where exports go."""

    keys: dict[str, str]
    export_dir: Path | None = None


class ConfigFileError(Exception):
    """The config file cannot be used; the message names the file and the key."""


def read_config(path: Path, known_actions: set[str]) -> UserConfig:
    """Parse the config file (missing is fine: defaults). Raises `ConfigFileError` in one line."""
    if not path.is_file():
        return UserConfig(keys={})
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"{path}: {e}") from None
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        raise ConfigFileError(f'{path}: [keys] must be a table of action = "key"')
    for action, key in keys.items():
        if action not in known_actions:
            raise ConfigFileError(f"{path}: keys.{action}: unknown action (known: {', '.join(sorted(known_actions))})")
        if not isinstance(key, str) or not key.strip():
            raise ConfigFileError(f'{path}: keys.{action}: expected a key such as "ctrl+g" or "f5,ctrl+g"')
    export = data.get("export", {}).get("dir") if isinstance(data.get("export"), dict) else None
    if export is not None and not isinstance(export, str):
        raise ConfigFileError(f"{path}: export.dir must be a path")
    return UserConfig(keys=dict(keys), export_dir=Path(export).expanduser() if export else None)
