"""Exact greedy argmax over an fp32 output head, reading mostly a bf16 copy of it.

On a CPU a one-session decode step is bound by how many weight bytes it streams, and the
text head (152,000 x 896 fp32 = 545 MB) is a quarter of them. Greedy decoding only needs
the index of the largest logit, and that can be found exactly without reading every fp32
row:

1. approximate logits A = bf16(h) . bf16(W)^T with the bf16 copy (half the bytes);
2. a rigorous bound |A_j - L_j| <= S_j = c ||h|| ||w_j|| on the error against the fp32
   logit L_j (rounding of h and w_j to bf16, of A to bf16, fp32 accumulation; Cauchy-Schwarz
   for the sum of |h_i w_ij|);
3. every j with A_j + S_j >= max_k (A_k - S_k) is a candidate: the fp32 argmax is one of
   them (any j left out has L_j < some L_k), and so is every index tied with it (one pass over
   A against max A and the largest S gives a superset that holds them and that maximum);
4. the candidates' fp32 logits are computed from the fp32 rows (measured on random real-size
   weights: 3-70 rows for one hidden state, ~220 for the union of eight) and their first
   maximum is the answer.

Step 4 uses the same `F.linear` as the full head on a subset of rows; for one row (one
session) the subset's logits are bitwise the full head's, so the argmax, ties included, is
the full head's (tested against `generate`). Measured on the 2-core Xeon (real-size text
head, out of cache): one row 20.2 -> 12 ms, eight rows 66 -> 14.5 ms; the bf16 product is
~11 ms of that, the screen and the exact rows the rest.

Used for greedy rows only; sampling (temperature, top-k/p) needs every logit and takes the
full fp32 head. Heads with several groups of logits (the 7 audio layers of 4,160 ids)
take one argmax per group.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from . import prepack

BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def error_bound_factor(n: int) -> float:
    """c such that |A_j - L_j| <= c ||h|| ||w_j|| for dot products of length n: bf16
    rounding of h, of w_j and of the result (3 u_bf16) plus fp32 accumulation of both the
    approximation and the exact logit (gamma_n each, bounded by n u_fp32 with room), with a
    1/8 margin for the rounding of the bound itself."""
    return 1.125 * (3 * BF16_UNIT_ROUNDOFF + 3 * n * FP32_UNIT_ROUNDOFF)


class ScreenedArgmax:
    """argmax(h @ W^T) over `groups` equal groups of W's rows, for fp32 W [V, C], exact."""

    def __init__(self, weight: torch.Tensor, groups: int = 1) -> None:
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.size(0) % groups:
            raise ValueError("ScreenedArgmax needs a 2-D fp32 weight whose rows split into equal groups")
        self.weight = weight.detach().contiguous()
        self.groups = groups
        low = self.weight.to(torch.bfloat16)
        # oneDNN's packed bf16 kernel where there is one (1.5x F.linear for few rows)
        self._low = prepack.PackedLinear(low, None, plain_rows=0) if prepack.available() else partial(F.linear, weight=low)
        self.norms = self.weight.double().norm(dim=1).float()
        self.group_max_norms = self.norms.view(groups, -1).amax(-1)
        self.factor = error_bound_factor(self.weight.size(1))
        self.candidates = 0  # fp32 rows read in the last call (for tests and stats)

    def approximate(self, hidden: torch.Tensor) -> torch.Tensor:
        """bf16 logits [R, V]."""
        return self._low(hidden.to(torch.bfloat16))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, C] fp32 -> ids [R] (one group) or [R, groups]."""
        R, V, G = hidden.size(0), self.weight.size(0), self.groups
        Vg = V // G
        shape = (R,) if G == 1 else (R, G)
        if R == 0:
            return torch.zeros(shape, dtype=torch.long, device=hidden.device)
        approx = self.approximate(hidden).view(R, G, Vg)  # bf16 values, compared exactly in fp32
        scale = (self.factor * hidden.norm(dim=1)).view(R, 1)  # slack of row j: scale * norms[j]
        top = approx.amax(-1).float()  # [R, G]
        if not bool(torch.isfinite(top).all()):  # a non-finite hidden state: no bound holds
            self.candidates = V
            return F.linear(hidden, self.weight).view(R, G, Vg).argmax(-1).view(shape)
        # Some k has approx_k = top, so the largest fp32 logit is >= top - scale * max norm, and
        # a candidate needs approx_j >= top - 2 * scale * max norm: one cheap pass, a superset.
        reach = (scale * self.group_max_norms.view(1, G)).view(R, G, 1)
        cols = (approx >= top.view(R, G, 1) - 2 * reach).view(R, V).any(0).nonzero()[:, 0]
        # On that superset, the exact test: approx_j + slack_j >= max_k (approx_k - slack_k),
        # whose maximum lies inside the superset too.
        group = torch.div(cols, Vg, rounding_mode="floor").expand(R, -1)
        a, slack = approx.view(R, V)[:, cols].float(), scale * self.norms[cols]
        floor = torch.full((R, G), float("-inf"), device=hidden.device).scatter_reduce_(1, group, a - slack, "amax")
        cols = cols[(a + slack >= floor.gather(1, group)).any(0)]
        # One exact product for the union of every row's candidates (ascending ids): a column
        # that is a candidate of another row only adds an exact logit below this row's max.
        self.candidates = len(cols)
        exact = F.linear(hidden, self.weight[cols])  # [R, U]
        if G == 1:  # first maximum over ascending ids: the full head's argmax, ties included
            return cols[exact.argmax(-1)]
        full = torch.full((R, V), float("-inf"), device=hidden.device)
        full[:, cols] = exact
        return full.view(R, G, Vg).argmax(-1)


def fast_bf16() -> bool:
    """Whether this CPU has oneDNN's packed bf16 kernel (AVX512-BF16 / AMX)."""
    return prepack.available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def screen_heads_(lm) -> bool:
    """Give an fp32 CPU model screened greedy heads (lm.text_argmax / lm.audio_argmax), in
    place; returns whether it did. A runtime transform, like prepacking."""
    from omni2.model import tokens as tk

    weight = lm.lm_head.weight
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not fast_bf16()
            or getattr(lm, "screened_heads", False)):
        return False  # (without a fast bf16 kernel the screen would cost more than it saves)
    with torch.no_grad():
        text = ScreenedArgmax(weight[tk.TEXT_SLICE])
        audio = ScreenedArgmax(weight[tk.PADDED_TEXT_VOCAB :], groups=tk.N_AUDIO_LAYERS)
    # instance attributes win over OmniLM's methods
    object.__setattr__(lm, "text_argmax", text)
    object.__setattr__(lm, "audio_argmax", audio)
    object.__setattr__(lm, "screened_heads", True)
    return True
