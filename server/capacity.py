"""How many sessions a device holds by default (`--max-sessions` unset, or 0).

A session is a slot: two rows of the engine's static KV cache (question and answer rows,
streaming/engine/engine.py), allocated once for `max_sessions` at start. So the default follows the
memory one session costs:

* GPU: what is free after the model loaded, less a reserve for activations, the vocoder and
  the allocator's slack (GPU_RESERVE_SHARE of the device's memory, at least GPU_RESERVE_BYTES),
  divided by a session's KV bytes (Mini-Omni2 bf16: 24 layers x 2 groups x 64 x 2049 positions
  x 2 (k, v) x 2 rows x 2 bytes = 48 MiB: ~1,500 sessions would fit 78 GiB; capped at GPU_MAX).
* CPU: CPU_SESSIONS (16), bounded by half the memory available now. 16 is what the 2-core
  development machine was measured to hold on the tiny model (issue 15's target, `omni2
  loadtest`); on a CPU the decode step, not memory, is the limit, and the engine's step-time
  admission (EngineConfig.step_budget_share) refuses answers past real time anyway.
"""
from __future__ import annotations

from typing import Optional

CPU_SESSIONS = 16
GPU_MAX = 1024
GPU_RESERVE_SHARE = 0.10
GPU_RESERVE_BYTES = 2 << 30


def session_bytes(cfg, dtype_bytes: int, context_len: Optional[int] = None) -> int:
    """KV-cache bytes of one session (two cache rows of context_len + 1 positions)."""
    positions = min(context_len or cfg.block_size, cfg.block_size) + 1
    return 2 * 2 * cfg.n_layer * cfg.n_query_groups * positions * cfg.head_size * dtype_bytes


def proc_bytes(path: str, key: str) -> Optional[int]:
    """A `key: N kB` line of a /proc file (Linux), in bytes; None where there is none."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def available_ram() -> Optional[int]:
    return proc_bytes("/proc/meminfo", "MemAvailable")


def default_sessions(device: str, per_session: int, free: Optional[int] = None,
                     total: Optional[int] = None) -> tuple[int, str]:
    """(sessions, why) for `device`; `free` / `total` bytes of its memory (None: unknown)."""
    if str(device).split(":")[0] == "cuda" and free is not None and total is not None:
        budget = free - max(GPU_RESERVE_BYTES, int(total * GPU_RESERVE_SHARE))
        n = max(1, min(GPU_MAX, budget // per_session))
        return n, f"{free / 2**30:.1f} GiB free on {device}, {per_session / 2**20:.0f} MiB KV cache per session"
    if free is not None:
        n = max(1, min(CPU_SESSIONS, (free // 2) // per_session))
        return n, f"CPU default {CPU_SESSIONS}, {free / 2**30:.1f} GiB available"
    return CPU_SESSIONS, f"CPU default {CPU_SESSIONS}"


def sessions_for(runtime, context_len: Optional[int] = None) -> tuple[int, str]:
    """The default for a loaded runtime (streaming/runtime.load_runtime)."""
    import torch

    device = str(runtime.device)
    per = session_bytes(runtime.lm.cfg, runtime.dtype.itemsize, context_len)
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return default_sessions(device, per, free, total)
    return default_sessions(device, per, available_ram())
