"""The engine's host policy on a CPU (see streaming/engine/host.py).

- threads (threads.py): the step thread's OpenMP team is the only long-lived one; encoders run
  on short-lived threads with all cores, the vocoder single-threaded; a narrow model (the
  tiny one) runs its steps and encoders on one thread each (threads.model_threads);
- the KV cache on 2 MiB pages (huge_pages.py), zero-filled on a short-lived thread, so the
  constructing thread keeps no team that would slow the step thread's down;
- the C heap keeps SNAC's big buffers for reuse, its arenas bounded, its free pages handed
  back now and then (malloc.py).
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from ..engine.host import HostPolicy
from . import huge_pages
from .malloc import keep_large_allocations, release_free_memory
from .threads import DEFAULT_THREADS, in_fresh_thread, model_threads, use_threads

T = TypeVar("T")


class CpuPolicy(HostPolicy):
    vocoder_threads = 1
    bucket_span = False

    def __init__(self, threads: int = 0, malloc_arena_max: int = 2, trim_interval_s: float = 10.0,
                 width: Optional[int] = None) -> None:
        """threads: the step's and encoders' torch threads (0: threads.model_threads of the
        model's `width` when given, else the process default)."""
        self.threads = threads or (model_threads(width) if width else DEFAULT_THREADS)
        self.trim_interval_s = trim_interval_s
        keep_large_allocations(malloc_arena_max)  # before the cache and SNAC allocate

    def allocate_cache(self, allocate: Callable[[Callable[..., torch.Tensor]], T]) -> T:
        return in_fresh_thread(allocate, huge_pages.zeros, threads=self.threads)

    def encode(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return in_fresh_thread(fn, *args, threads=self.threads, name="omni2-encode", **kwargs)

    def enter_step_thread(self) -> None:
        use_threads(self.threads)

    def housekeeping(self) -> Optional[tuple[float, Callable[[], None]]]:
        return (self.trim_interval_s, release_free_memory) if self.trim_interval_s > 0 else None
