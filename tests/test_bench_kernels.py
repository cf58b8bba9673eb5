"""`omni2 bench kernels` smoke run: one block's matrices, a few rows, the real-size heads."""
from __future__ import annotations

import pytest
import torch

from omni2.streaming.cpu import features as cpu_features, few_rows, prepack
from omni2.clients.tools.bench_kernels import body_shapes, run_kernel_bench
from omni2.streaming.engine.runtime import UnsupportedDtype
from omni2.streaming.cpu.screened_argmax import fast_bf16

from cpu_marks import needs  # noqa: E402


def test_body_shapes_are_the_released_blocks():
    shapes = body_shapes(24)
    assert len(shapes) == 120
    assert abs(sum(o * i for o, i in shapes) * 4 / 1e9 - 1.43) < 0.01  # the 1.43 GB a step streams


def test_kernel_bench_prints_every_kernel_and_checks_the_screens():
    lines = []
    result = run_kernel_bench(rows=(2, 3), layers=1, head_rows=(1, 9), repeats=1, out=lines.append)
    kinds = {"mkl"} | ({"onednn"} if prepack.available() else set()) | ({"few_rows"} if few_rows.kernel() else set())
    assert set(result["body"]) == {2, 3}
    assert all(set(ms) == kinds and all(v > 0 for v in ms.values()) for ms in result["body"].values())
    # every screen that ran gave the fp32 argmax (the bench raises otherwise) and rechecked few rows
    text1 = result["heads"]["text/1"]
    assert ("bf16_rechecked" in text1) == fast_bf16()  # (the runtime screens heads only there)
    if fast_bf16():
        assert 1 <= text1["bf16_rechecked"] < 1000
    if few_rows.kernel() is not None and fast_bf16():
        assert 1 <= text1["int8_rechecked"] < 1000
        # 9 rows screen through bf16, or through int8 where the rows are quantized too (VNNI)
        assert ("int8" in result["heads"]["text/9"]) == cpu_features.has("vnni")
    assert any(line.startswith("greedy heads") for line in lines) and len(lines) == 3 + 2 + 2 + 4


@needs("bf16")
def test_kernel_bench_runs_the_body_in_bf16():
    lines = []
    result = run_kernel_bench(rows=(2,), layers=1, repeats=1, heads=False, dtype=torch.bfloat16, out=lines.append)
    assert result["dtype"] == "bf16" and abs(result["body_gb"] - 1.43 / 24 / 2) < 0.001  # half the fp32 bytes
    kinds = {"mkl"} | ({"onednn"} if prepack.available() else set()) | ({"few_rows"} if few_rows.kernel() else set())
    assert set(result["body"][2]) == kinds
    assert "bf16 matrices" in lines[1]


def test_kernel_bench_refuses_bf16_where_the_cpu_has_no_native_bf16(monkeypatch):
    monkeypatch.setenv("OMNI2_CPU_DISABLE", "bf16")
    with pytest.raises(UnsupportedDtype, match="bf16 switched off"):
        run_kernel_bench(rows=(2,), layers=1, repeats=1, heads=False, dtype=torch.bfloat16, out=lambda line: None)
