"""`omni2 bench kernels`: the CPU kernels of a decode step, each against the library's own.

1. The body's matrices (real-size shapes, seeded random fp32 weights) times a few rows: MKL's
   plain F.linear (what the weights as loaded use), oneDNN's packed kernel, and few_rows (few_rows.c).
2. The greedy heads: the full fp32 head + argmax, against the screened argmax through bf16
   and through int8 (screened_argmax.py), with the fp32 rows each screen had to recheck.

Times are medians over --repeats passes; every pass reads the weights from memory (they are
far larger than the caches), as a decode step does.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from omni2.model import tokens as tk
from omni2.model.config import PRESETS

from omni2.streaming.cpu import features as cpu_features, prepack
from omni2.streaming.cpu.few_rows import kernel as few_rows_kernel
from omni2.streaming.engine.runtime import UnsupportedDtype
from omni2.streaming.cpu.screened_argmax import ScreenedArgmax, fast_bf16


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def body_shapes(layers: int) -> list[tuple[int, int]]:
    """(out, in) of every matrix of `layers` Mini-Omni2 blocks: qkv, proj, fc_1, fc_2, mlp proj."""
    c = PRESETS["mini-omni2"]
    block = [(c.qkv_rows, c.n_embd), (c.n_embd, c.n_head * c.head_size), (c.intermediate_size, c.n_embd),
             (c.intermediate_size, c.n_embd), (c.n_embd, c.intermediate_size)]
    return block * layers


@torch.inference_mode()
def run_kernel_bench(rows=(1, 2, 8, 16, 64, 256), layers: int = 24, head_rows=(1, 8, 16), repeats: int = 5,
                     heads: bool = True, dtype: torch.dtype = torch.float32, out=print) -> dict:
    """dtype: the body's weights and rows (bf16: few_rows sums in fp32 and its result is
    rounded to bf16, as PackedLinear does; refused where the CPU has no native bf16). The heads
    are fp32 (the screens are fp32's; the bf16 screen only where the runtime would take it)."""
    if dtype == torch.bfloat16 and (reason := cpu_features.missing("bf16")) is not None:
        raise UnsupportedDtype(f"bench kernels --dtype bf16: {reason}")
    few = few_rows_kernel()
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, i, generator=g) * i ** -0.5).to(dtype) for o, i in body_shapes(layers)]
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    out(f"# omni2 bench kernels: torch threads={torch.get_num_threads()}, few_rows "
        f"{'built' if few else 'NOT available (see the log)'}, oneDNN {'yes' if prepack.available() else 'no'}")
    out(f"body: {layers} layers' {name} matrices ({gb:.2f} GB), ms for all of them (GB/s):")
    out(f"{'rows':>6} {'MKL F.linear':>16} {'oneDNN packed':>16} {'few_rows':>16}")
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 2) for w in weights] if prepack.available() else None
    packed = [few.pack(w) for w in weights] if few else None
    result = {"dtype": name, "body_gb": gb, "body": {}, "heads": {}}
    for m in rows:
        xs = {n: torch.randn(m, n, generator=g).to(dtype) for n in {w.size(1) for w in weights}}
        kernels = {"mkl": lambda: [F.linear(xs[w.size(1)], w) for w in weights]}
        if onednn:
            kernels["onednn"] = lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], p, None, "none", [], "")
                                         for w, p in zip(weights, onednn)]
        if packed:
            kernels["few_rows"] = lambda: [few.linear(xs[w.size(1)].float(), p, w.size(0)).to(dtype)
                                           for w, p in zip(weights, packed)]
        ms = {name: _median_ms(fn, repeats) for name, fn in kernels.items()}
        result["body"][m] = ms
        cells = [f"{ms[k]:7.1f} ({gb / ms[k] * 1000:4.1f})" if k in ms else f"{'-':>14}"
                 for k in ("mkl", "onednn", "few_rows")]
        out(f"{m:>6} " + " ".join(f"{c:>16}" for c in cells))
    if heads:
        result["heads"] = _head_bench(few, head_rows, repeats, g, out)
    return result


def _head_bench(few, head_rows, repeats: int, g: torch.Generator, out) -> dict:
    c = PRESETS["mini-omni2"]
    head = torch.randn(c.padded_vocab_size, c.n_embd, generator=g) * c.n_embd ** -0.5
    parts = {"text": (head[tk.TEXT_SLICE], 1), "audio": (head[tk.PADDED_TEXT_VOCAB:], tk.N_AUDIO_LAYERS)}
    out("greedy heads: full fp32 head + argmax vs screened argmax, ms [fp32 rows rechecked]:")
    out(f"{'head':>6} {'rows':>5} {'full fp32':>10} {'bf16 screen':>18} {'int8 screen':>18}")
    result = {}
    for name, (weight, groups) in parts.items():
        weight = weight.contiguous()
        screens = {}
        if fast_bf16():  # (screen_heads_ screens only there)
            screens["bf16"] = ScreenedArgmax(weight, groups)
        if few and fast_bf16():
            # as the runtime screens them: the text head's rows quantized too where the CPU can
            screens["int8"] = ScreenedArgmax(weight, groups, int8=few, vnni=name == "text")
        for r in head_rows:
            h = torch.randn(r, c.n_embd, generator=g)
            full_pick = lambda: F.linear(h, weight).view(r, groups, -1).argmax(-1)  # noqa: E731
            full = full_pick().view(r, -1)
            row = {"full": _median_ms(full_pick, repeats)}
            cells = []
            for kind in ("bf16", "int8"):
                s = screens.get(kind)
                if s is None or s.screen(r) is not getattr(s, kind):  # (int8 screens few rows only)
                    cells.append("-")
                    continue
                if not torch.equal(s(h).view(r, -1), full):
                    raise AssertionError(f"{name} head, {kind} screen: not the fp32 argmax")
                row[kind] = _median_ms(lambda: s(h), repeats)
                row[f"{kind}_rechecked"] = s.candidates
                cells.append(f"{row[kind]:.2f} [{s.candidates}]")
            result[f"{name}/{r}"] = row
            out(f"{name:>6} {r:>5} {row['full']:>10.2f} {cells[0]:>18} {cells[1]:>18}")
    return result
