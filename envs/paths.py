"""Where cached artefacts (checkpoints, predictors, unpacked datasets) live."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CHANNELPRUNE_CACHE"


def cache_dir() -> Path:
    """``$CHANNELPRUNE_CACHE`` if set, else ``~/.cache/channelprune``; created on first use."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "channelprune")
    path.mkdir(parents=True, exist_ok=True)
    return path
