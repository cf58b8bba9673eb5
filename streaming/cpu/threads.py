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

A team pays only when a parallel region has work to split. A model whose layers are narrower
than `NARROW_WIDTH` (the tiny model: 32 wide) runs all of its work, steps and encoders, on one
thread each (`model_threads`): measured on the 2-core machine with turns arriving (tiny, 16
sessions, 1 turn/s), the step thread's second OpenMP thread burnt as much CPU as the step
thread itself (10.8 s of 11 s, spinning between regions) for a step time no shorter (p50
10.9-11.1 ms with 2 threads, 8.3-12.3 ms with 1), and every encoder call brought a second team
of 2 onto the 2 cores: encoder call p99 407 ms (2 threads) against 132-187 ms (1 thread), the
work itself ~14 ms. One thread each, no parallel region ever waits for a worker the kernel
has descheduled.
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


# below this model width (n_embd) a parallel region's share of work costs less than waking a team
NARROW_WIDTH = 256


def model_threads(width: int, threads: int = DEFAULT_THREADS) -> int:
    """Torch threads for a model's work (decode steps, encoders) on a CPU: one for a model
    narrower than NARROW_WIDTH, else `threads`."""
    return 1 if width < NARROW_WIDTH else threads


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
