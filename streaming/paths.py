"""Where omni2 keeps what it generates or builds: a leaf module (no omni2 imports), so that the
runtime (checkpoints) and the CPU kernels (compiled libraries) both use it without importing
each other."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """omni2's own cache (OMNI2_CACHE, else ~/.cache/omni2): what it generates or builds."""
    return Path(os.environ.get("OMNI2_CACHE", Path.home() / ".cache" / "omni2"))
