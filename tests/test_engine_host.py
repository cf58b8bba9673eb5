"""The engine's host policy (streaming/engine/host.py): every point where a CPU deployment runs
differently goes through one object, the CPU's in streaming/cpu/policy.py."""
from __future__ import annotations

import time

import numpy as np

from omni2.streaming.cpu.policy import CpuPolicy
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine, host_policy
from omni2.streaming.engine.host import HostPolicy
from omni2.streaming.engine.messages import TurnDone, TurnRequest


class Recording(HostPolicy):
    """The GPU's policy (nothing arranged), noting which of its hooks the engine called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def allocate_cache(self, allocate):
        self.calls.append("allocate_cache")
        return super().allocate_cache(allocate)

    def encode(self, fn, *args, **kwargs):
        self.calls.append("encode")
        return super().encode(fn, *args, **kwargs)

    def enter_step_thread(self) -> None:
        self.calls.append("enter_step_thread")

    def housekeeping(self):
        self.calls.append("housekeeping")
        return 0.01, lambda: self.calls.append("job")


def answer(engine: Engine) -> TurnDone:
    sid = engine.open_session()
    audio = (0.1 * np.random.RandomState(3).randn(8000)).astype(np.float32)
    return [ev for ev in engine.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=12)).events(timeout=300)
            if isinstance(ev, TurnDone)][0]


def test_a_cpu_engine_takes_the_cpu_policy_and_a_gpu_one_none():
    assert isinstance(host_policy("cpu", EngineConfig()), CpuPolicy)
    gpu = host_policy("cuda", EngineConfig())  # (no device is touched to choose)
    assert type(gpu) is HostPolicy and gpu.bucket_span and gpu.vocoder_threads is None
    cpu = CpuPolicy(threads=3, trim_interval_s=0)
    assert cpu.threads == 3 and cpu.vocoder_threads == 1 and not cpu.bucket_span and cpu.housekeeping() is None


def test_the_engine_runs_through_the_policy_it_is_given_with_the_same_tokens(tiny_model):
    config = EngineConfig(max_sessions=1, record_tokens=True, step_budget_share=0)
    with Engine(tiny_model, config) as eng:
        assert isinstance(eng.host, CpuPolicy)
        expected = answer(eng)
    host = Recording()
    with Engine(tiny_model, config, host=host) as eng:
        assert eng.host is host and eng.vocoder.threads is None
        done = answer(eng)
        while "job" not in host.calls:  # the housekeeping job runs on its own thread
            time.sleep(0.01)
    assert done.reason == "max_steps" and done.stats["audio_ids"] == expected.stats["audio_ids"]
    assert {"allocate_cache", "encode", "enter_step_thread", "housekeeping", "job"} <= set(host.calls)
    assert host.calls[0] == "allocate_cache"
