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
