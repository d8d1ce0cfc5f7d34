"""Where things live: the dataset mirror, the user's own cards, the cache. Environment first."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

DATA_DIR_ENV = "TAXON_DATA_DIR"
CARDS_DIR_ENV = "TAXON_CARDS_DIR"
CACHE_DIR_ENV = "TAXON_CACHE_DIR"


def data_dir() -> Path | None:
    """The local mirror of Hub datasets (`<org>/<name>/<config>/<split>.jsonl`), if one is set."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def cards_dir() -> Path | None:
    """A folder of the user's own dataset cards, read after the built-in ones."""
    value = os.environ.get(CARDS_DIR_ENV)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Converted models, stage checkpoints: shared by every study of this user."""
    value = os.environ.get(CACHE_DIR_ENV)
    path = Path(value).expanduser() if value else Path(user_cache_dir("taxon"))
    path.mkdir(parents=True, exist_ok=True)
    return path
