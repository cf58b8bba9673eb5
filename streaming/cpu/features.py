"""What this CPU runs natively: read once, the one place every CPU fast path asks.

Each fast path below needs something of the CPU or of the system; where it is missing the
path is not taken (the caller logs why, once) and a slower one that runs everywhere is:

| feature      | needs                                         | used by                                  | without it                                  |
|--------------|-----------------------------------------------|------------------------------------------|---------------------------------------------|
| `avx512`     | avx512f                                       | our C kernels (few_rows.c, decode_attention.c) | MKL / oneDNN kernels, the model's attention |
| `vnni`       | avx512 and avx512_vnni                        | the int8 x int8 head screen              | int8 weights widened to fp32 sums           |
| `bf16`       | avx512bw+avx512vl+avx512dq or avx_ne_convert, and torch's oneDNN saying so | bf16 models on the CPU, prepacked bf16 matrices, the bf16 head screen | fp32 (`--dtype auto`); `--dtype bf16` is refused at start |
| `amx`        | amx_bf16 and amx_tile                         | (oneDNN's own bf16 speed; reported only)  |                                             |
| `cc`         | a C compiler (`$CC`, else `cc`) on PATH       | building the C kernels                   | as without `avx512`                         |
| `huge_pages` | Linux transparent huge pages not "never"      | huge_pages.py (packed weights, KV cache) | plain torch tensors                         |

torch's and oneDNN's own switches are followed: `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 machine makes torch, oneDNN and omni2 all behave as
on an AVX2-only CPU (torch then refuses bf16 packing exactly as such a CPU does). A single
feature is taken away with `OMNI2_CPU_DISABLE`, a comma list of the names above (`avx512`
also takes away what needs it: `vnni`, and `bf16` unless the CPU has avx_ne_convert; `all`
takes away every one). The older per-kernel switches (OMNI2_FEW_ROWS=0,
OMNI2_DECODE_ATTENTION=0, OMNI2_VNNI=0, OMNI2_HUGE_PAGES=0) still turn one path off.

`python -m omni2.streaming.cpu.features` prints the CPU model, its relevant flags and what
omni2 will use (`.ci/run` starts with it).
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
from pathlib import Path
from typing import Optional

import torch

FEATURES = ("avx512", "vnni", "bf16", "amx", "cc", "huge_pages")
# /proc/cpuinfo flags worth printing when a run has to be read
RELEVANT_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx512_bf16", "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
DISABLE_VAR = "OMNI2_CPU_DISABLE"


def _cpuinfo() -> tuple[str, frozenset]:
    """(model name, flags) from /proc/cpuinfo; ("", empty) where it cannot be read."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    return _cpuinfo()[0]


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    return _cpuinfo()[1]


def disabled() -> frozenset:
    """The feature names OMNI2_CPU_DISABLE takes away (read on every call: tests set it)."""
    names = {n.strip().lower() for n in os.environ.get(DISABLE_VAR, "").split(",") if n.strip()}
    if "all" in names:
        return frozenset(FEATURES)
    unknown = names - set(FEATURES)
    if unknown:
        raise ValueError(f"{DISABLE_VAR}: unknown feature(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(FEATURES)}, all")
    return frozenset(names)


def _thp_setting() -> str:
    try:
        return THP_SETTING.read_text().strip()
    except OSError:
        return ""


def missing(feature: str) -> Optional[str]:
    """Why `feature` is not available here (a short reason for a log line or a test skip),
    or None where it is."""
    if feature not in FEATURES:
        raise ValueError(f"unknown CPU feature {feature!r}; known: {', '.join(FEATURES)}")
    off = disabled()
    if feature in off:
        return f"{feature} switched off ({DISABLE_VAR}={os.environ.get(DISABLE_VAR)})"
    flags = cpu_flags()
    if feature == "avx512":
        if "avx512f" not in flags:
            return "the CPU has no AVX-512 (avx512f)"
        capability = torch.backends.cpu.get_cpu_capability()
        return None if capability.startswith("AVX512") else f"torch runs at {capability} here (ATEN_CPU_CAPABILITY)"
    if feature == "vnni":
        return missing("avx512") or (None if "avx512_vnni" in flags else "the CPU has no AVX512-VNNI")
    if feature == "bf16":
        avx512_bf16 = {"avx512bw", "avx512vl", "avx512dq"} <= flags and "avx512" not in off
        if not (avx512_bf16 or "avx_ne_convert" in flags):
            return "the CPU has neither avx512bw/vl/dq nor avx_ne_convert, which oneDNN's bf16 kernels need"
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return "this torch build's oneDNN has no bf16 kernels for this CPU"
        return None
    if feature == "amx":
        return None if {"amx_bf16", "amx_tile"} <= flags else "the CPU has no AMX"
    if feature == "cc":
        cc = os.environ.get("CC", "cc")
        return None if shutil.which(cc) else f"no C compiler ({cc}) on PATH"
    # huge_pages
    setting = _thp_setting()
    if "[always]" in setting or "[madvise]" in setting:
        return None
    return f"transparent huge pages are off here ({setting or 'no THP setting'})"


def has(feature: str) -> bool:
    return missing(feature) is None


def report() -> str:
    """The CPU, its relevant flags and each feature's verdict, for logs and CI output."""
    flags = cpu_flags()
    lines = [f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), torch {torch.__version__} "
             f"capability {torch.backends.cpu.get_cpu_capability()}",
             "flags: " + (" ".join(f for f in RELEVANT_FLAGS if f in flags) or "(none of interest)")]
    switches = [f"{k}={os.environ[k]}" for k in (DISABLE_VAR, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                if os.environ.get(k)]
    if switches:
        lines.append("switches: " + " ".join(switches) + " (emulating a CPU without what they take away)")
    lines += [f"  {name:<10} {'yes' if (why := missing(name)) is None else 'no: ' + why}" for name in FEATURES]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
