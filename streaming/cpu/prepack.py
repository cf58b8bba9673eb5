"""CPU weight prepacking: the language model's matrices in the layouts of faster kernels.

A decode step multiplies a handful of rows (2 per session) by every weight of the model, so
on a CPU it is bound by how fast the weights stream from memory, and the kernel matters:
measured on this project's 2-core Xeon (AVX-512 + AMX), out of cache, one 4864x896 matrix:

    rows   fp32 F.linear   fp32 prepacked   bf16 F.linear   bf16 prepacked
      2        788 us           840 us           750 us          460 us
     16       2002 us          1309 us           789 us          492 us

`F.linear` re-lays-out a bf16 weight on every call and MKL's fp32 kernel slows down sharply
past two rows; a weight packed once at load time avoids both. oneDNN's bf16 results are
bitwise equal to `F.linear`'s (checked in the tests).

fp32 decode steps (1 to FEW_ROWS_MAX rows: up to 32 sessions) take our few_rows kernel
(few_rows.py, weights on 2 MiB pages) where it builds: the body's matrices at 2 rows (one
session) 59 ms vs MKL's 73, at 16 rows 91 vs oneDNN's 131 (`omni2 bench kernels`); bf16 ones
of one or two sessions too (BF16_FEW_ROWS_MAX), as fp32 sums rounded to bf16. Each of its outputs is one
multiply-add chain in k order, so a session's decode step gives the same bits whatever other
sessions share it. Prompt chunks (more rows) take the oneDNN packed kernel. Both round
differently from MKL's plain kernel in the last bits (as MKL itself does between one and two
rows), so tokens match the plain model's rather than its bits (tested; checked in every
`omni2 bench engine` run). Without few_rows, fp32 keeps MKL's plain kernel for <= 2 rows.

`prepack_(lm)` (through accelerate.accelerate_) changes the model in place (a runtime transform: a prepacked model is not
saved); it is a no-op off the CPU, where cuBLAS needs nothing of the kind. What it takes
depends on the CPU (cpu/features.py): without AVX-512 (or a C compiler) no few_rows kernel,
no fused decode attention, no int8 screen; without native bf16 no bf16 screen of the fp32
heads, and a bf16 model is not packed at all (oneDNN refuses to pack bf16 for such a CPU;
the runtime refuses `--dtype bf16` there in the first place). fp32 packing itself runs on
any x86-64 oneDNN supports (AVX2 included).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from omni2.model import tokens as tk

from . import features as cpu_features

log = logging.getLogger("omni2.prepack")

# Rows up to which fp32 keeps MKL's plain kernel (one session's two rows) where few_rows is
# not built: oneDNN's packed kernel is slower there.
FP32_PLAIN_ROWS = 2
# Rows up to which fp32 uses the few_rows kernel where it is built (32 sessions' decode step);
# longer calls (prompt chunks) are oneDNN's, as fast or faster there (256 rows: 712 vs 719 ms
# for the body's matrices, 613 vs 673 in another run; `omni2 bench kernels`).
FEW_ROWS_MAX = 64
# bf16 weights take few_rows (fp32 sums of the widened weights) up to this many rows (two
# sessions): beyond, oneDNN's AMX kernel wins (`omni2 bench kernels --dtype bf16`, the body's
# 0.72 GB: 2 rows 40 vs 50 ms, 4 rows 44 vs 44, 8 rows 48 vs 45, 16 rows 72 vs 45).
BF16_FEW_ROWS_MAX = 4


def available() -> bool:
    """Whether this torch build has the oneDNN packed-linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed once. `few_rows` (a few_rows.FewRowsKernel) takes calls of
    up to FEW_ROWS_MAX rows (fp32) or BF16_FEW_ROWS_MAX (bf16: summed in fp32, the result
    rounded to bf16 as oneDNN's is); else `plain_rows` > 0 keeps W for calls of that many."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plain_rows: int, few_rows=None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if weight.dtype == torch.bfloat16 and not cpu_features.has("bf16"):
            plain_rows = sys.maxsize  # oneDNN cannot pack bf16 for this CPU: torch's generic kernel
            self.packed = None
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2)
        self.bias = None if bias is None else bias.detach()
        self.few_rows = few_rows
        self.few_packed = None if few_rows is None else few_rows.pack(weight)
        self.few_rows_max = FEW_ROWS_MAX if weight.dtype == torch.float32 else BF16_FEW_ROWS_MAX
        self.few_bias = None if self.bias is None or few_rows is None else self.bias.float()
        self.plain_rows = 0 if few_rows is not None else plain_rows
        self.weight = weight.detach() if self.plain_rows else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows == 0:  # e.g. no session still writing text this step
            return x.new_zeros(*x.shape[:-1], self.out_features)
        x2 = x.reshape(rows, self.in_features)
        if self.few_packed is not None and rows <= self.few_rows_max:
            y = self.few_rows.linear(x2.float(), self.few_packed, self.out_features, self.few_bias).to(x.dtype)
        elif rows <= self.plain_rows:
            return F.linear(x, self.weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, plain_rows={self.plain_rows}, "
                f"few_rows={self.few_packed is not None}")


class _AudioHead:
    """Packed stand-in for OmniLM.audio_logits: [..., 7, 4160] from the audio head slice."""

    def __init__(self, linear: PackedLinear) -> None:
        self.linear = linear

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).unflatten(-1, (tk.N_AUDIO_LAYERS, tk.PADDED_AUDIO_VOCAB))


def prepack_(lm: nn.Module, few_rows: bool | None = None) -> bool:
    """Pack the transformer blocks' and the split heads' weights in place; returns whether it
    did (CPU, fp32/bf16, oneDNN present, not done before).

    few_rows: an fp32 model's blocks get the few_rows kernel for decode steps; a bf16 model's
    blocks and heads get it for one or two sessions' steps; None: where it builds, False:
    never (MKL's plain kernel for one fp32 session, oneDNN for the rest), True: required.
    accelerate.accelerate_ adds the fp32 model's screened heads and fused attention.

    Memory (Mini-Omni2, fp32; resident size of a process holding the LM): 3.8 GB as loaded,
    6.1 GB prepacked, as the body is kept twice (few_rows for decode steps, oneDNN for
    prompts; its plain weights are freed when nothing else holds them) and the heads gain a
    packed, a bf16 and an int8 copy."""
    weight = lm.lm_head.weight
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or not available() or getattr(lm, "prepacked", False)):
        return False
    if weight.dtype == torch.bfloat16 and (reason := cpu_features.missing("bf16")) is not None:
        log.warning("bf16 weights not prepacked (%s): torch's generic bf16 kernels, slowly; "
                    "fp32 (--dtype auto) is the fast choice on this CPU", reason)
        return False
    plain = FP32_PLAIN_ROWS if weight.dtype == torch.float32 else 0
    kernel = None
    if few_rows is not False:
        from .few_rows import kernel as few_rows_kernel

        kernel = few_rows_kernel()
        if kernel is None and few_rows:
            raise RuntimeError("the few_rows kernel was required but is not available here (see the log)")
    for block in lm.transformer.h:
        for parent, name in ((block.attn, "attn"), (block.attn, "proj"), (block.mlp, "fc_1"),
                             (block.mlp, "fc_2"), (block.mlp, "proj")):
            linear = getattr(parent, name)
            setattr(parent, name, PackedLinear(linear.weight, linear.bias, plain, kernel))
    with torch.no_grad():
        # (fp32 greedy heads are screened below; bf16 ones stream the head itself)
        head_kernel = kernel if weight.dtype == torch.bfloat16 else None
        text = PackedLinear(weight[tk.TEXT_SLICE].contiguous(), None, plain, head_kernel)
        audio = PackedLinear(weight[tk.PADDED_TEXT_VOCAB:].contiguous(), None, plain, head_kernel)
    # Instance attributes win over the class's methods: the engine and `generate` call
    # lm.text_logits / lm.audio_logits and get the packed heads. lm_head itself stays for
    # the full-vocabulary `logits()`.
    object.__setattr__(lm, "text_logits", text)
    object.__setattr__(lm, "audio_logits", _AudioHead(audio))
    object.__setattr__(lm, "prepacked", True)
    return True
