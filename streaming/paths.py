"""Where omni2 keeps what it generates or builds: a leaf module (settings.py only), so that the
runtime (checkpoints) and the CPU kernels (compiled libraries) both use it without importing
each other."""
from __future__ import annotations

from pathlib import Path

from .settings import switches


def cache_root() -> Path:
    """omni2's own cache (OMNI2_CACHE, else ~/.cache/omni2): what it generates or builds."""
    return switches().cache
