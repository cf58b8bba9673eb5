"""fp32 products of a few rows by a large weight: our AVX-512 kernel (few_rows.c).

A decode step of n sessions multiplies 2n rows by every weight of the model. On a CPU the
library kernels are at their best for one session (MKL, bound by memory) and for long
prompts (oneDNN, bound by arithmetic), but in between they do one and then the other:
`omni2 bench kernels` on this project's 2-core Xeon VM, the 24 layers' matrices (1.43 GB fp32;
few_rows' packed copies on 2 MiB pages, huge_pages.py):

    rows     MKL F.linear   oneDNN packed   few_rows
      1          68 ms          76 ms          60 ms
      2          73 ms          86 ms          59 ms
      8         164 ms          96 ms          66 ms
     16         203 ms         131 ms          91 ms
     64         333 ms         252 ms         229 ms
    256         859 ms         712 ms         719 ms

few_rows keeps the weight streaming while it multiplies (see the C file). Each output is one
fused multiply-add chain in k order whatever the batch, so a row's result does not depend on
the other rows: prepack.py gives it every fp32 decode step, one session's included, and a
session's step then has the same bits whatever other sessions share it. Its last bits differ
from MKL's (as MKL's own differ between one and two rows). The same loop reads bf16 weights
(summed in fp32: a bf16 model's steps of one or two sessions) and int8 weights with a scale
per output (`int8_linear`): the screened greedy heads' cheap first pass
(screened_argmax.py; real-size text head, one row: 5.5 ms screened vs 13.5 ms through bf16);
where the CPU has AVX512-VNNI, the rows are quantized to int8 as well (`quantize_rows`,
`u8s8_linear`: exact integer sums, 4 products per multiply-add, so 8 rows cost about what one
does).

The C file is compiled with the system's C compiler at first use into omni2's cache (about a
second) and called through ctypes. Where that cannot happen (no compiler, no AVX-512, or
OMNI2_FEW_ROWS=0), `kernel()` says why in the log and returns None, and callers keep the
library kernels.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import features as cpu_features, huge_pages, native

log = logging.getLogger("omni2.few_rows")

SOURCE = Path(__file__).with_name("few_rows.c")
CFLAGS = [*native.BASE_CFLAGS, "-fno-math-errno"]  # (sqrt inline: no libm needed)


class FewRowsKernel:
    """The compiled kernel: pack a weight once, then multiply rows by it."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fns = {torch.float32: library.omni2_few_rows_linear, torch.bfloat16: library.omni2_few_rows_bf16,
                     torch.int8: library.omni2_few_rows_int8}
        for fn in self._fns.values():
            fn.restype = ctypes.c_int
            fn.argtypes = [p, i64, i64, p, i64, p, p, ctypes.c_int]
        self.block = library.omni2_block_columns()
        self._u8s8 = library.omni2_few_rows_u8s8
        self._u8s8.restype = ctypes.c_int
        self._u8s8.argtypes = [p, i64, i64, p, i64, p, p, p, p, ctypes.c_int]
        self._quantize = library.omni2_quantize_rows
        self._quantize.restype = None
        self._quantize.argtypes = [p, i64, i64, i64, p, p, p, p]
        # int8 x int8 products (u8s8_linear) need AVX512-VNNI; OMNI2_VNNI=0 turns them off
        self.vnni = cpu_features.has("vnni") and os.environ.get("OMNI2_VNNI", "1") != "0"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] fp32, bf16 or int8 -> [ceil(N/48), K, 48], zero-padded: each block one run of
        memory, on 2 MiB pages where the system allows (huge_pages.py)."""
        if weight.dtype not in self._fns or weight.dim() != 2:
            raise ValueError(f"few_rows: can pack 2-D fp32, bf16 or int8 weights, not {weight.dtype} {tuple(weight.shape)}")
        return self._blocks(weight)

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """[N, K] of any element type -> [ceil(N/48), K, 48], zero-padded, on huge pages."""
        n, k = weight.shape
        weight, full = weight.detach(), n // self.block  # blocks of 48 whole columns
        packed = huge_pages.empty((-(-n // self.block), k, self.block), weight.dtype)
        packed[:full].copy_(weight[: full * self.block].reshape(full, self.block, k).transpose(1, 2))
        if full < packed.size(0):  # the last block, zero-padded
            packed[full].zero_()[:, : n - full * self.block].copy_(weight[full * self.block :].t())
        return packed

    def linear(self, x: torch.Tensor, packed: torch.Tensor, n_out: int,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [M, K] fp32 -> x W^T (+ bias) [M, n_out] fp32, W packed fp32 or bf16 (summed in
        fp32: a bf16 W gives bitwise the fp32 kernel's result for W widened to fp32)."""
        return self._call(x, packed, n_out, bias)

    def int8_linear(self, x: torch.Tensor, packed: torch.Tensor, n_out: int, scales: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 -> (x Q^T) * scales [M, n_out], Q packed int8, scales fp32 [n_out]."""
        if scales.dtype != torch.float32 or scales.shape != (n_out,):
            raise ValueError(f"few_rows: need {n_out} fp32 scales")
        return self._call(x, packed, n_out, scales.contiguous())

    def pack_u8s8(self, q: torch.Tensor) -> torch.Tensor:
        """int8 [N, K] -> [ceil(N/48), ceil(K/4), 48, 4] for u8s8_linear: per 4 k, each output's 4
        weights side by side (vpdpbusd's layout); zero-padded."""
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"few_rows: pack_u8s8 takes 2-D int8 weights, not {q.dtype} {tuple(q.shape)}")
        k4 = -(-q.size(1) // 4)
        if 4 * k4 != q.size(1):
            q = F.pad(q, (0, 4 * k4 - q.size(1)))
        # each output's 4 weights of a k group are one 32-bit element: pack()'s block layout
        words = q.detach().contiguous().view(torch.int32)  # [N, k4]
        return self._blocks(words).view(torch.int8).view(-1, k4, self.block, 4)

    def quantize_rows(self, x: torch.Tensor, k_padded: int) -> tuple:
        """fp32 rows [M, K] -> (xq uint8 [M, k_padded]: round(x / scale) + 128, zero-padded;
        scale [M] fp32: max|x_r| / 127; err [M] float64: ||x_r - scale q_r||; qnorm [M] float64:
        ||q_r||). A row with a non-finite value gets a NaN scale."""
        if x.dtype != torch.float32 or x.dim() != 2 or k_padded < x.size(1):
            raise ValueError(f"few_rows: quantize_rows takes fp32 rows of at most {k_padded}, not {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        m = x.size(0)
        xq = torch.empty(m, k_padded, dtype=torch.uint8)
        scale, err, qnorm = torch.empty(m), torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
        self._quantize(x.data_ptr(), m, x.size(1), k_padded, xq.data_ptr(), scale.data_ptr(), err.data_ptr(),
                       qnorm.data_ptr())
        return xq, scale, err, qnorm

    def u8s8_linear(self, xq: torch.Tensor, row_scale: torch.Tensor, packed: torch.Tensor, n_out: int,
                    colsum: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
        """((xq - 128) Q^T) * row_scale[:, None] * col_scale [M, n_out]: xq uint8 [M, 4 * packed.size(1)]
        (int8 rows offset by 128), Q packed by pack_u8s8, colsum [n_out] int32 (Q's row sums);
        the integer sums exact, then two fp32 roundings. Needs `self.vnni`."""
        if not self.vnni:
            raise RuntimeError("few_rows: u8s8_linear needs AVX512-VNNI")
        m, k = xq.shape
        if (xq.dtype != torch.uint8 or k != 4 * packed.size(1) or -(-n_out // self.block) != packed.size(0)
                or row_scale.shape != (m,) or colsum.shape != (n_out,) or col_scale.shape != (n_out,)
                or colsum.dtype != torch.int32 or row_scale.dtype != torch.float32 or col_scale.dtype != torch.float32):
            raise ValueError(f"few_rows: u8s8_linear arguments do not fit: xq {xq.dtype} {tuple(xq.shape)}, "
                             f"packed {tuple(packed.shape)}, {n_out} outputs")
        xq, row_scale = xq.contiguous(), row_scale.contiguous()
        y = torch.empty(m, n_out, dtype=torch.float32)
        if m and self._u8s8(xq.data_ptr(), m, k, packed.data_ptr(), n_out, colsum.contiguous().data_ptr(),
                            row_scale.data_ptr(), col_scale.contiguous().data_ptr(), y.data_ptr(),
                            torch.get_num_threads()) != 0:
            raise MemoryError("few_rows: a thread could not allocate its accumulators")
        return y

    def _call(self, x: torch.Tensor, packed: torch.Tensor, n_out: int, per_col: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.size(1) != packed.size(1):
            raise ValueError(f"few_rows: need fp32 CPU rows [M, {packed.size(1)}], got {x.dtype} {tuple(x.shape)}")
        if -(-n_out // self.block) != packed.size(0):
            raise ValueError(f"few_rows: {n_out} outputs do not fit a packed weight of {packed.size(0)} blocks")
        x = x.contiguous()
        y = torch.empty(x.size(0), n_out, dtype=torch.float32)
        if x.size(0) == 0:
            return y
        rc = self._fns[packed.dtype](x.data_ptr(), x.size(0), x.size(1), packed.data_ptr(), n_out,
                                     None if per_col is None else per_col.data_ptr(), y.data_ptr(),
                                     torch.get_num_threads())
        if rc != 0:
            raise MemoryError("few_rows: a thread could not allocate its accumulators")
        return y


def _unavailable(reason: str) -> None:
    log.warning("few-rows fp32 kernel not used (%s): decode steps keep the library kernels (MKL for one "
                "fp32 session, oneDNN beyond) and greedy heads screen through bf16 only", reason)


def build(out_dir: Path) -> Path:
    """Compile few_rows.c into out_dir (once per source and compiler flags); returns the .so."""
    return native.build(SOURCE, out_dir, CFLAGS)


@functools.lru_cache(maxsize=None)
def kernel() -> Optional[FewRowsKernel]:
    """The kernel, built and loaded on first call; None (and a log line) where it cannot be
    (no AVX-512, no compiler, or OMNI2_FEW_ROWS=0)."""
    lib = native.library_or_none(SOURCE, CFLAGS, "OMNI2_FEW_ROWS", _unavailable)
    if lib is not None:
        log.info("few-rows fp32 kernel: %s", lib._name)
    return None if lib is None else FewRowsKernel(lib)
