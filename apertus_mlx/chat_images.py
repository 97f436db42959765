"""A chat's images as code grids, by content: kept with the chat (and saved with it), so a later turn's
render reads an image's codes instead of encoding it again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import vision


class ChatImages:
    """Code grids by `vision.url_key`; `encoder()` gives the model's `ImageTokenizer` when one is needed."""

    def __init__(self, encoder: Callable[[], vision.ImageTokenizer]):
        self._encoder = encoder
        self._grids: dict[str, np.ndarray] = {}

    def __bool__(self) -> bool:
        return bool(self._grids)

    def codes(self, urls: list[str]) -> list[np.ndarray]:
        """The grid of each image, encoding the ones not seen before (an image without a key every time)."""
        grids = []
        for url in urls:
            key = vision.url_key(url)
            grid = self._grids.get(key) if key is not None else None
            if grid is None:
                grid = self._encoder().grid(vision.image_source(url))
                if key is not None:
                    self._grids[key] = grid
            grids.append(grid)
        return grids

    def known(self, urls: list[str]) -> bool:
        """Whether every image already has its codes (so no MLX work is due)."""
        return all(vision.url_key(url) in self._grids for url in urls)

    def keep_only(self, urls: list[str]) -> None:
        """Forget the images the chat no longer shows."""
        keys = {vision.url_key(url) for url in urls}
        self._grids = {k: g for k, g in self._grids.items() if k in keys}

    def to_json(self) -> dict[str, Any]:
        return {key: grid.tolist() for key, grid in self._grids.items()}

    def load(self, saved: dict[str, Any]) -> None:
        self._grids = {key: np.asarray(grid, dtype=np.int64) for key, grid in saved.items()}
