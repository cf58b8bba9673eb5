"""This package's C kernels (few_rows.c, decode_attention.c): built and loaded at first use.

Each C file is compiled with the system's C compiler (`$CC`, else `cc`; about a second) into
omni2's cache, once per source text and flags, and loaded through ctypes. They need an
AVX-512 CPU and a C compiler (cpu/features.py); where one cannot be built or is switched off,
`library()` raises `Unavailable` with the reason, and the caller keeps the library kernels
and says so in the log.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable, Optional

from ..paths import cache_root
from . import features as cpu_features

BASE_CFLAGS = ["-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC"]


class Unavailable(RuntimeError):
    """A kernel cannot be built or loaded here, or is switched off; the message says why."""


def build(source: Path, out_dir: Path, cflags: list[str]) -> Path:
    """Compile `source` into out_dir (once per source text and flags); returns the .so."""
    if not source.is_file():  # (an install that left the C file out)
        raise Unavailable(f"{source.name} is not installed beside {Path(__file__).name}")
    tag = hashlib.sha256(source.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    lib = out_dir / f"{source.stem}-{tag}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.tmp{os.getpid()}")
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, *cflags, "-o", str(tmp), str(source)], check=True, capture_output=True, text=True)
        tmp.replace(lib)  # atomic: concurrent builders each write their own tmp
    except subprocess.CalledProcessError as exc:
        raise Unavailable(f"{cc} failed: {exc.stderr.strip()[-500:]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return lib


def library(source: Path, cflags: list[str], switch: str) -> ctypes.CDLL:
    """`source` built into the cache and loaded. switch: the environment variable that turns
    it off (=0)."""
    if os.environ.get(switch, "1") == "0":
        raise Unavailable(f"off ({switch}=0)")
    for feature in ("avx512", "cc"):
        reason = cpu_features.missing(feature)
        if reason is not None:
            raise Unavailable(reason)
    lib = build(source, cache_root() / "kernels", cflags)
    try:
        return ctypes.CDLL(str(lib))
    except OSError as exc:
        raise Unavailable(str(exc)) from None


def library_or_none(source: Path, cflags: list[str], switch: str, unavailable: Callable[[str], None]) -> Optional[ctypes.CDLL]:
    """library(), or None after unavailable(reason) (the caller's log line) where it cannot be."""
    try:
        return library(source, cflags, switch)
    except Unavailable as exc:
        unavailable(str(exc))
        return None
