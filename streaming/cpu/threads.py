"""Who may run multi-threaded torch work on a CPU, so the decode step keeps its speed.

PyTorch's CPU kernels run on OpenMP (libgomp). Each thread that runs a parallel region keeps
its own team of worker threads for as long as it lives, and once libgomp manages more
threads than there are CPUs it stops spinning between parallel regions ("throttled"
waiting), which costs every one of the ~150 small parallel regions of a decode step a
wake-up. Measured on this project's 2-core machine (real-size model, bf16, prepacked): one
decode step takes 61-67 ms when the step thread's team is the only one, 79-82 ms once any
other thread (the one that loaded the model, an encoder thread) has a team of its own.

So, on a CPU: the step thread runs with all threads; work that must not hold a team
(the vocoder, the VAD) runs with one thread; heavy, rare work that wants all cores (the
speech/image encoders) runs on a short-lived thread whose team ends with it.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_local = threading.local()
# torch's own default (one per physical core, or OMP_NUM_THREADS), read before anything here
# changes it: torch.set_num_threads also becomes the default of threads started later.
DEFAULT_THREADS = torch.get_num_threads()


def use_threads(n: int) -> None:
    """Set this thread's torch intra-op threads (an OpenMP per-thread setting)."""
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def single_threaded() -> None:
    """This thread's torch work runs on it alone: no OpenMP team, no effect on others."""
    use_threads(1)


def in_fresh_thread(fn: Callable[..., T], *args, threads: int, name: str = "omni2-work", **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread with `threads` torch threads, waited for; its
    OpenMP team ends when it returns. Exceptions propagate to the caller."""
    box: dict = {}

    def run() -> None:
        use_threads(threads)
        try:
            with torch.inference_mode():
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
