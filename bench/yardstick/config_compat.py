"""Add the config.json keys that released Apertus checkpoints carry and mlx-lm requires.

transformers 5 folds RoPE settings into ``rope_parameters`` and implies QK-norm, but the
published Apertus configs (and mlx-lm's ``apertus`` ModelArgs) also spell out
``rope_theta``, ``rope_scaling``, ``qk_norm``, ``post_norm`` and ``mlp_bias``. Writing them
keeps our checkpoints loadable by both.

    python -m bench.yardstick.config_compat apertus_mlx/demo_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_compat_keys(folder: Path) -> None:
    """Rewrite ``folder/config.json`` with the explicit Apertus keys (idempotent)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    cfg.setdefault("rope_theta", rope.get("rope_theta", 12000000.0))
    cfg.setdefault("rope_scaling", rope)
    cfg.setdefault("qk_norm", True)  # Apertus normalises queries and keys per head
    cfg.setdefault("post_norm", False)  # pre-norm blocks
    cfg.setdefault("mlp_bias", False)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    """Patch each folder given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+")
    for folder in ap.parse_args().folders:
        add_compat_keys(folder)


if __name__ == "__main__":
    main()
