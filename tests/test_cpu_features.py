"""Every CPU fast path asks streaming/cpu/features.py, and where a feature is missing the
fallback runs and gives the same answers. The missing features are emulated here with
OMNI2_CPU_DISABLE (the same check the runtime makes), so these run on every machine; the
whole suite is also run with torch's own switches (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2) as an AVX2-only CPU (see the README)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2.model.bundle import load_model
from omni2.model.generate import generate
from omni2.streaming.cpu import decode_attention, features as cpu_features, few_rows, huge_pages, native, prepack
from omni2.streaming.cpu.accelerate import accelerate_
from omni2.streaming.cpu.decode_attention import DecodeAttention
from omni2.streaming.engine.runtime import UnsupportedDtype, load_runtime, pick_dtype
from omni2.streaming.cpu.screened_argmax import ScreenedArgmax, fast_bf16, screen_heads_


@pytest.fixture
def without(monkeypatch):
    """without("avx512", "bf16"): this process behaves as a CPU lacking those (the cached
    kernels are dropped before and after)."""
    caches = (few_rows.kernel, decode_attention.kernel, huge_pages.available)

    def clear() -> None:
        for cached in caches:
            cached.cache_clear()

    def take_away(*features: str) -> None:
        monkeypatch.setenv(cpu_features.DISABLE_VAR, ",".join(features))
        clear()

    yield take_away
    monkeypatch.delenv(cpu_features.DISABLE_VAR, raising=False)
    clear()


def question(seed, seconds=0.6):
    return (0.1 * np.random.RandomState(seed).randn(int(16000 * seconds))).astype(np.float32)


def test_the_switch_takes_features_away_with_what_needs_them(without):
    without("avx512")
    assert "switched off" in cpu_features.missing("avx512")
    assert cpu_features.missing("vnni")  # VNNI is an AVX-512 extension
    if "avx_ne_convert" not in cpu_features.cpu_flags():
        assert cpu_features.missing("bf16")  # oneDNN's bf16 needs AVX-512 (or AVX-NE-CONVERT)
    without("all")
    assert all(cpu_features.missing(f) for f in cpu_features.FEATURES)
    report = cpu_features.report()
    assert "CPU: " in report and "OMNI2_CPU_DISABLE=all" in report
    assert all(f"  {f}" in report for f in cpu_features.FEATURES)
    without("avx1024")
    with pytest.raises(ValueError, match="unknown feature.*avx1024"):
        cpu_features.has("avx512")
    with pytest.raises(ValueError, match="unknown CPU feature"):
        cpu_features.missing("sse9")


def test_huge_pages_follow_the_systems_setting(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(cpu_features, "THP_SETTING", setting)
    setting.write_text("always madvise [never]\n")
    assert "off here (always madvise [never])" in cpu_features.missing("huge_pages")
    setting.write_text("always [madvise] never\n")
    assert cpu_features.has("huge_pages")
    setting.unlink()
    assert "no THP setting" in cpu_features.missing("huge_pages")


def test_without_avx512_the_c_kernels_are_not_built_and_say_why(without, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI2_CACHE", str(tmp_path))
    without("avx512")
    with pytest.raises(native.Unavailable, match="avx512 switched off"):
        native.library(few_rows.SOURCE, few_rows.CFLAGS, "OMNI2_FEW_ROWS")
    with caplog.at_level(logging.WARNING):
        assert few_rows.kernel() is None and few_rows.kernel() is None
        assert decode_attention.kernel() is None
    assert caplog.text.count("few-rows fp32 kernel not used (avx512 switched off") == 1  # logged once
    assert "decode-attention kernel not used (avx512 switched off" in caplog.text
    assert not (tmp_path / "kernels").exists()  # nothing was compiled


def test_without_bf16_a_bf16_linear_is_torchs_plain_kernel_bit_for_bit(without):
    without("bf16")
    torch.manual_seed(0)
    w, b = torch.randn(300, 96).bfloat16(), torch.randn(300).bfloat16()
    lin = prepack.PackedLinear(w, b, plain_rows=0)
    assert lin.packed is None
    for rows in (1, 2, 16, 40):
        x = torch.randn(rows, 96).bfloat16()
        assert torch.equal(lin(x), F.linear(x, w, b))


def test_without_bf16_the_screened_head_still_gives_the_fp32_argmax_and_the_runtime_skips_it(without):
    without("bf16")
    assert not fast_bf16()
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(7 * 64, 48, generator=g)
    head = ScreenedArgmax(weight, groups=7)  # its bf16 screen on torch's generic kernel
    h = torch.randn(5, 48, generator=g)
    assert torch.equal(head(h), F.linear(h, weight).view(5, 7, -1).argmax(-1))


def test_an_avx2_only_cpu_prepacks_fp32_on_onednn_alone_with_the_plain_tokens(without, tiny_checkpoint, caplog):
    """As an AVX2-only CPU without AVX-NE-CONVERT: no C kernels, no bf16 head screen, no fused
    attention; fp32 still prepacks (oneDNN's fp32 kernels run on AVX2) and gives the plain
    model's tokens. A bf16 model is not packed at all, and says so."""
    without("avx512", "bf16")
    plain = load_model(tiny_checkpoint, snac=None)
    packed = load_model(tiny_checkpoint, snac=None)
    assert accelerate_(packed.lm)
    fc = packed.lm.transformer.h[0].mlp.fc_1
    assert fc.few_packed is None and fc.packed is not None
    assert not getattr(packed.lm, "screened_heads", False) and not screen_heads_(packed.lm)
    assert not isinstance(packed.lm.transformer.h[0].attn, DecodeAttention)
    for seed in (1, 2):
        prompt, embeds = plain.encode_question(question(seed))
        ref = generate(plain.lm, prompt, embeds, 16)
        got = generate(packed.lm, prompt, embeds, 16)
        assert got.audio_tokens == ref.audio_tokens and got.text_tokens == ref.text_tokens
    bf16 = load_model(tiny_checkpoint, snac=None, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="omni2.prepack"):
        assert not accelerate_(bf16.lm)
    assert "bf16 weights not prepacked (bf16 switched off" in caplog.text
    assert type(bf16.lm.transformer.h[0].mlp.fc_1) is torch.nn.Linear


def test_auto_picks_fp32_on_a_cpu_and_an_explicit_bf16_is_refused_where_it_cannot_run(without):
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bf16", "cuda") == torch.bfloat16  # (the GPU's own business)
    without("bf16")
    assert pick_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(UnsupportedDtype) as err:
        pick_dtype("bf16", "cpu")
    message = str(err.value)
    assert "\n" not in message and "--dtype bf16 cannot run on this CPU" in message and "--dtype fp32" in message
    with pytest.raises(UnsupportedDtype):
        load_runtime("tiny", device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("command", [["serve", "--device", "cpu", "--port", "18471"], ["bench", "model"],
                                     ["bench", "engine"], ["bench", "kernels"]], ids=" ".join)
def test_a_command_with_a_bf16_the_cpu_cannot_run_stops_at_start_with_one_line(command):
    env = {**os.environ, cpu_features.DISABLE_VAR: "bf16"}
    proc = subprocess.run([sys.executable, "-m", "omni2.clients.cli", *command, "--dtype", "bf16"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bf16 switched off" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
