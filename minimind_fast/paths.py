"""Where minimind_fast keeps what it builds once and reuses: the default corpus, the default
tokenizer and the token caches all live under one cache directory."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MINIMIND_FAST_CACHE"


def default_cache_dir() -> Path:
    """$MINIMIND_FAST_CACHE if set, else ~/.cache/minimind_fast (created on demand by writers)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minimind_fast"
