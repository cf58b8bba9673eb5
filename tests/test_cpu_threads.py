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



def test_a_narrow_model_runs_on_one_thread_a_wide_one_on_the_cores():
    """The CPU policy (streaming/ENGINE_API.md): no OpenMP team for a model whose layers are too
    narrow to split (the tiny model); a configured thread count wins over the width rule."""
    from omni2.streaming.cpu.policy import CpuPolicy

    assert cpu_threads.model_threads(32, threads=4) == 1
    assert cpu_threads.model_threads(cpu_threads.NARROW_WIDTH - 1, threads=4) == 1
    assert cpu_threads.model_threads(896, threads=4) == 4
    assert CpuPolicy(width=32, trim_interval_s=0).threads == 1
    assert CpuPolicy(width=896, trim_interval_s=0).threads == cpu_threads.DEFAULT_THREADS
    assert CpuPolicy(threads=2, width=32, trim_interval_s=0).threads == 2
    assert CpuPolicy(trim_interval_s=0).threads == cpu_threads.DEFAULT_THREADS   # width unknown


def test_the_tiny_engine_steps_and_encodes_on_one_thread(tiny_model):
    import numpy as np

    from omni2.streaming.engine.config import EngineConfig
    from omni2.streaming.engine.engine import Engine
    from omni2.streaming.engine.messages import TurnDone, TurnRequest

    seen = []
    with Engine(tiny_model, EngineConfig(max_sessions=1)) as eng:
        assert eng.host.threads == 1
        encode = eng.host.encode

        def recording(fn, *args, **kwargs):   # the threads the encoder call itself runs with
            def inside(*a, **k):
                seen.append(torch.get_num_threads())
                return fn(*a, **k)
            return encode(inside, *args, **kwargs)

        eng.host.encode = recording
        step = eng.executor.decode

        def step_recording(*args):
            seen.append(("step", torch.get_num_threads()))
            return step(*args)

        eng.executor.decode = step_recording
        audio = (0.1 * np.random.RandomState(1).randn(8000)).astype(np.float32)
        turn = eng.submit(TurnRequest(session_id=eng.open_session(), audio_16k=audio, max_steps=4))
        assert isinstance(list(turn.events(timeout=60))[-1], TurnDone)
    assert seen and set(seen) <= {1, ("step", 1)} and ("step", 1) in seen, seen


def test_model_width_is_the_lm_configs_width(tiny_model):
    """engine.model_width reads the LM's own n_embd (the width rule's input), also for a model
    whose head is absent or not a plain Linear."""
    from types import SimpleNamespace

    from omni2.streaming.engine.engine import model_width

    assert model_width(tiny_model) == tiny_model.lm.cfg.n_embd
    headless = SimpleNamespace(lm=SimpleNamespace(cfg=SimpleNamespace(n_embd=640)))
    assert model_width(headless) == 640
    assert model_width(SimpleNamespace()) is None
