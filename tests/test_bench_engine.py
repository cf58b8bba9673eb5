"""`omni2 bench engine` on the tiny checkpoint: it runs, and its token checks hold."""
from __future__ import annotations

from omni2.clients.tools.bench_engine import run_engine_bench


def test_engine_bench_smoke_every_phase_gives_the_baselines_tokens():
    lines = []
    result = run_engine_bench(size="tiny", sessions=(1, 2), steps=12, repeats=1, out=lines.append)
    assert result["identical_tokens"] is True
    assert set(result["phases"]) == {"text written", "text ended", "whole answer"}
    for name, phase in result["phases"].items():
        assert phase["identical_tokens"] is True, name
        assert phase["baseline_steps_per_s"] > 0 and phase["engine_steps_per_s"] > 0
        assert len(phase["paired_ratios"]) == 1 and phase["speedup"] == phase["paired_ratios"][0]
    assert [r["sessions"] for r in result["runs"]] == [1, 1, 2, 2]
    assert any("whole answer" in line for line in lines)
    assert any("prepacked" in line for line in lines)  # the engine ran on the packed copy


def test_a_run_with_no_step_of_every_session_is_run_again_with_longer_answers(monkeypatch):
    """When shared prefill spreads the prompts so far apart that no decode step had every
    session, the throughput run doubles the answers' length instead of failing on an empty
    median (it crashed `bench engine --model real --sessions 8`)."""
    import numpy as np
    import torch

    from omni2.clients.tools import bench_engine
    import collections

    lengths = []

    class Unrecorded(collections.deque):
        def append(self, n):
            pass

    class FirstRunNeverFull(bench_engine.Engine):
        def __enter__(self):
            lengths.append(self.config.max_steps)
            if len(lengths) == 1:
                self.step_sessions = Unrecorded()  # as if no step had every session
            return super().__enter__()

    monkeypatch.setattr(bench_engine, "Engine", FirstRunNeverFull)
    run = bench_engine.engine_run(bench_engine.random_model("tiny", torch.float32, "cpu"), sessions=2, steps=10, audio=np.zeros(16000, np.float32))
    assert lengths == [10, 20] and run.sessions == 2 and run.aggregate_steps_per_s > 0
