"""How the engine uses the machine under it: one strategy object the engine calls at the few
points where a deployment differs (threads, the KV cache's memory, encoder calls, periodic
housekeeping). `HostPolicy` is the GPU's: nothing to arrange. A CPU's is
streaming/cpu/policy.py (CpuPolicy), chosen by `engine.host_policy`."""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


class HostPolicy:
    # torch threads of the vocoder's worker (None: as the process has them)
    vocoder_threads: Optional[int] = None
    # decode steps attend to a span rounded up to EngineConfig.compile_span_bucket: cuDNN's
    # attention plans are reused (a CPU gains nothing from it and computes the masked rest)
    bucket_span: bool = True

    def allocate_cache(self, allocate: Callable[[Callable[..., torch.Tensor]], T]) -> T:
        """allocate(zeros) builds the KV cache with the given zero-filled allocator."""
        return allocate(torch.zeros)

    def encode(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run an encoder call (Whisper, CLIP, adapters) on the prep thread."""
        return fn(*args, **kwargs)

    def enter_step_thread(self) -> None:
        """Called first on the step thread."""

    def housekeeping(self) -> Optional[tuple[float, Callable[[], None]]]:
        """(interval in seconds, job) to run on a thread of its own while the engine runs, or None."""
        return None
