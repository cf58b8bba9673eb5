"""streaming/cpu/threads.py: short-lived threads with their own torch thread count."""
from __future__ import annotations

import threading

import pytest
import torch

from omni2.streaming.cpu import threads as cpu_threads


def test_in_fresh_thread_returns_raises_and_sets_only_its_own_threads():
    caller = torch.get_num_threads()
    seen = {}

    def work(x, scale=1):
        seen["thread"] = threading.current_thread().name
        seen["threads"] = torch.get_num_threads()
        seen["grad"] = torch.is_grad_enabled()
        return x * scale

    assert cpu_threads.in_fresh_thread(work, 3, scale=2, threads=1, name="omni2-test") == 6
    assert seen == {"thread": "omni2-test", "threads": 1, "grad": False}
    assert torch.get_num_threads() == caller  # the caller's setting is its own

    def fail():
        raise ValueError("bad question")

    with pytest.raises(ValueError, match="bad question"):
        cpu_threads.in_fresh_thread(fail, threads=1)

