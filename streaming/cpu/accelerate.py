"""The CPU fast path in one call: `accelerate_(lm)` prepacks the matrices (prepack.py) and, for
an fp32 model, screens the greedy heads (screened_argmax.py) and fuses the decode step's
attention (decode_attention.py). Each piece depends only on the kernels below it; this module
is the one that knows the order, so none of them imports another back."""
from __future__ import annotations

import torch
import torch.nn as nn

from .decode_attention import fuse_decode_attention_
from .few_rows import kernel as few_rows_kernel
from .prepack import prepack_
from .screened_argmax import screen_heads_


def accelerate_(lm: nn.Module, few_rows: bool | None = None) -> bool:
    """The CPU transforms of `lm`, in place; returns whether it prepacked (see prepack_: CPU,
    fp32/bf16, oneDNN present, not done before). few_rows as prepack_'s: None where the kernel
    builds, False never, True required."""
    if not prepack_(lm, few_rows):
        return False
    if lm.lm_head.weight.dtype == torch.float32:  # greedy picks from a bf16 screen of the heads: same ids
        screen_heads_(lm, int8=None if few_rows is False else few_rows_kernel())
        if few_rows is not False:  # a decode step's attention in one C call per layer
            fuse_decode_attention_(lm)
    return True
