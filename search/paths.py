"""The cache root of what cn4 computes once and reuses."""

from __future__ import annotations

import os
from pathlib import Path


def cn4_home() -> Path:
    """Return the cache root: ``$CN4_HOME``, or ``~/.cache/cn4`` when it is unset."""
    configured = os.environ.get("CN4_HOME")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "cn4"
    root.mkdir(parents=True, exist_ok=True)
    return root
