"""Default max sessions sized to the device (server/capacity.py)."""
from __future__ import annotations

from omni2.model.config import ModelConfig
from omni2.server.access import Admission
from omni2.server.capacity import CPU_SESSIONS, GPU_MAX, default_sessions, session_bytes


def test_a_session_costs_two_kv_rows_of_the_whole_window():
    cfg = ModelConfig()   # Mini-Omni2's shape: 24 layers, 2 KV groups of 64, 2048 positions
    assert session_bytes(cfg, 2) == 2 * 2 * 24 * 2 * 2049 * 64 * 2
    assert session_bytes(cfg, 2, context_len=1024) < session_bytes(cfg, 2)


def test_gpu_default_follows_free_memory_and_cpu_default_is_bounded():
    per = 48 << 20
    n, why = default_sessions("cuda:0", per, free=40 << 30, total=80 << 30)
    assert n == ((40 << 30) - (8 << 30)) // per and "GiB free" in why     # less 10% of 80 GiB
    assert default_sessions("cuda", per, free=1 << 30, total=80 << 30)[0] == 1
    assert default_sessions("cuda", 1 << 20, free=70 << 30, total=80 << 30)[0] == GPU_MAX
    assert default_sessions("cpu", per, free=64 << 30)[0] == CPU_SESSIONS
    assert default_sessions("cpu", per, free=10 * per)[0] == 5                 # half the RAM at most
    assert default_sessions("cpu", per)[0] == CPU_SESSIONS


def test_admission_takes_the_loaded_engines_figure_unless_one_was_given():
    sized = {}
    auto = Admission(0, lambda: sized.get("n"))
    assert auto.limit == CPU_SESSIONS            # an engine that does not say
    sized["n"] = 3
    assert [auto.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert Admission(2, lambda: 99).limit == 2
