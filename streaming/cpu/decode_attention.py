"""A CPU decode step's attention in one call per layer (decode_attention.c).

The model's Attention makes ~15 torch calls per layer to rotate, write the cache and attend;
in a decode step each finds its caches cold (the weights streamed since evict them) and the
calls cost more than their arithmetic. `fuse_decode_attention_(lm)` swaps each block's
Attention for `DecodeAttention`, which sends fp32 decode steps (one new position per row,
every cache row in order: the engine's step) to the C kernel and everything else (prompt
chunks, bf16, other devices) to the model's own code. A runtime transform, like prepacking.
Measured in the engine on this project's 2-core Xeon (real-size model, fused and not
alternating in one process, 3 pairs each): a decode step 1.08x faster at one session, 1.10x
at eight; the kernel itself takes ~40 us a layer for one session and ~170-310 us for eight
(their keys and values come from memory).

Bits: the rotated keys and the values written to the cache are the model's, bit for bit;
the attention output sums in another order than SDPA does and differs in the last bits
(tested against it), as the prepacked products do; tokens are checked against the plain
model's in the tests and in every `omni2 bench engine` run. A row's result does not depend
on the other rows of the step.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from omni2.model.lm import Attention, KVCache, StepContext

from . import native

log = logging.getLogger("omni2.decode_attention")

SOURCE = Path(__file__).with_name("decode_attention.c")
# -ffp-contract=off: the rotation's products and sum are rounded one by one, as torch's calls do
CFLAGS = [*native.BASE_CFLAGS, "-ffp-contract=off"]
MAX_HEAD, MAX_QUERIES = 128, 64  # the C file's 16 * MAX_CHUNKS and MAX_QUERIES


class DecodeAttentionKernel:
    """The compiled kernel (checked arguments in, y out; the cache written in place)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn = library.omni2_decode_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, i64, i64, i64, ctypes.c_float, p, ctypes.c_int]

    def __call__(self, qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, q_per_kv: int, scale: float) -> torch.Tensor:
        """qkv [B, G*(Q+2)*D] fp32 (per group: Q queries, key, value); pos [B] int64; cos/sin
        [B, D] (each row's rotation at its position); k/v one layer's cache [>=B, G, L, D] fp32
        -> y [B, G*Q*D]; writes the rotated keys and the values at (b, g, pos[b])."""
        B, G, D = qkv.size(0), k.size(1), k.size(3)
        if not (qkv.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == torch.float32 and pos.dtype == torch.int64):
            raise ValueError("decode_attention: fp32 tensors and int64 positions only")
        if (qkv.shape != (B, G * (q_per_kv + 2) * D) or pos.shape != (B,) or k.shape != v.shape
                or k.stride() != v.stride() or k.size(0) < B or k.stride(3) != 1 or cos.shape != sin.shape
                or cos.shape != (B, D) or not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())):
            raise ValueError(f"decode_attention: shapes do not fit: qkv {tuple(qkv.shape)}, cache {tuple(k.shape)}")
        pos = pos.contiguous()
        y = torch.empty(B, G * q_per_kv * D)
        rc = self._fn(qkv.data_ptr(), B, G, q_per_kv, D, pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.size(2), scale, y.data_ptr(),
                      torch.get_num_threads())
        if rc == -1:
            raise IndexError(f"decode_attention: a position of {pos.tolist()} is outside the cache")
        if rc == -3:
            raise ValueError(f"decode_attention: heads of {D} (at most 128) with {q_per_kv} queries (at most 64)")
        if rc != 0:
            raise MemoryError("decode_attention: a thread could not allocate its scratch memory")
        return y


@functools.lru_cache(maxsize=None)
def kernel() -> Optional[DecodeAttentionKernel]:
    """The kernel, built and loaded on first call; None (and a log line) where it cannot be
    (no AVX-512, no compiler, or OMNI2_DECODE_ATTENTION=0)."""
    lib = native.library_or_none(SOURCE, CFLAGS, "OMNI2_DECODE_ATTENTION", lambda reason: log.warning(
        "decode-attention kernel not used (%s): decode steps attend through torch", reason))
    return None if lib is None else DecodeAttentionKernel(lib)


class DecodeAttention(nn.Module):
    """The model's Attention `inner` (its weights, its code for anything but a decode step),
    with fp32 decode steps through the kernel."""

    def __init__(self, inner: Attention, kernel: DecodeAttentionKernel) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.kernel = kernel

    def forward(self, x: torch.Tensor, ctx: StepContext, layer: int, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        if T != 1 or ctx.rows is not None or x.dtype != torch.float32 or cache.k.dtype != torch.float32:
            return self.inner(x, ctx, layer, cache)
        cfg = self.cfg
        qkv = self.inner.attn(x).view(B, -1)
        # ctx.cos/sin [B,1,1,1,D]: each row's angles at its position, gathered once per step
        y = self.kernel(qkv, ctx.pos.view(B), ctx.cos.view(B, -1), ctx.sin.view(B, -1), cache.k[layer],
                        cache.v[layer], cfg.q_per_kv, cfg.head_size ** -0.5)
        return self.inner.proj(y.view(B, 1, -1))


def fuse_decode_attention_(lm: nn.Module, kernel_: Optional[DecodeAttentionKernel] = None) -> bool:
    """Give an fp32 CPU model's blocks DecodeAttention, in place; returns whether it did
    (kernel_: None builds/loads ours)."""
    cfg = lm.cfg
    if lm.lm_head.weight.device.type != "cpu" or lm.lm_head.weight.dtype != torch.float32:
        return False
    if cfg.head_size > MAX_HEAD or cfg.q_per_kv > MAX_QUERIES:  # (the kernel's fixed scratch)
        return False
    if any(isinstance(block.attn, DecodeAttention) for block in lm.transformer.h):
        return False
    kernel_ = kernel_ or kernel()
    if kernel_ is None:
        return False
    for block in lm.transformer.h:
        block.attn = DecodeAttention(block.attn, kernel_)
    return True
