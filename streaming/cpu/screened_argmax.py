"""Exact greedy argmax over an fp32 output head, reading mostly a low-precision copy of it.

On a CPU a one-session decode step is bound by how many weight bytes it streams, and the
text head (152,000 x 896 fp32 = 545 MB) is a quarter of them. Greedy decoding only needs
the index of the largest logit, and that can be found exactly without reading every fp32
row:

1. approximate logits A from a low-precision copy of W: int8 with a scale per row (a
   quarter of the bytes, our few_rows kernel; the rows quantized to int8 too where the CPU
   has AVX512-VNNI) for calls of up to 8 rows (16 with VNNI), else bf16 (half the bytes,
   oneDNN's AMX kernel, faster for many rows);
2. a rigorous bound |A_j - L_j| <= S_j on the error against the fp32 logit L_j, a sum of
   per-call coefficients times per-row terms. bf16: S_j = ||h|| c ||w_j|| (rounding of h and
   w_j to bf16, of A to bf16, fp32 accumulation; Cauchy-Schwarz for the sum of |h_i w_ij|);
   int8: from the exact residual norms ||w_j - s_j q_j|| and, with quantized rows, ||h - s_h
   q_h|| (Int8Screen);
3. every j with A_j + S_j >= max_k (A_k - S_k) is a candidate: the fp32 argmax is one of
   them (any j left out has L_j < some L_k), and so is every index tied with it (one pass over
   A against max A and the largest S gives a superset that holds them and that maximum);
4. the candidates' fp32 logits are computed from the fp32 rows (measured on random real-size
   weights: 3-70 rows for one hidden state, ~220 for the union of eight; with quantized rows
   ~50 and ~320) and their first maximum is the answer.

Step 4 uses the same `F.linear` as the full head on a subset of rows; for one row (one
session) the subset's logits are bitwise the full head's, so the argmax, ties included, is
the full head's (tested against `generate`). `omni2 bench kernels` on the 2-core Xeon
(real-size text head, out of cache): one row 20.5 ms full, 13.5 through bf16, 5.5 through
int8; eight rows 67.4 ms full, 15.9 bf16, 10.9 int8 widened to fp32 sums (9.7 with VNNI);
sixteen 72.5 full, 18.9 bf16 (16.6 int8 with VNNI).

Used for greedy rows only; sampling (temperature, top-k/p) needs every logit and takes the
full fp32 head. Heads with several groups of logits (the 7 audio layers of 4,160 ids)
take one argmax per group.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from . import features as cpu_features, prepack

BF16_UNIT_ROUNDOFF = 2.0 ** -8
FP32_UNIT_ROUNDOFF = 2.0 ** -24
# The bounds are multiplied by this before use: room for the rounding of the bound itself
# and of the comparisons made with it.
BOUND_MARGIN = 1.125
# Up to this many rows the int8 screen (few_rows kernel) is the faster one; more rows take
# the bf16 copy (AMX): real-size text head's product alone, 2-core Xeon: 1 row 5.7 vs 11.1 ms,
# 8 rows 8.4 vs 11.5 ms, 16 rows 15.1 vs 11.7 ms. With the rows quantized too (AVX512-VNNI),
# up to INT8_VNNI_ROWS: whole greedy pick, 8 rows 9.7 ms (11.8 widened), 16 rows 16.6 (21.0
# widened, 23.0 through bf16).
INT8_SCREEN_ROWS = 8
INT8_VNNI_ROWS = 16


def gamma(n: int) -> float:
    """The classic bound on the relative error of an fp32 dot product of length n."""
    return n * FP32_UNIT_ROUNDOFF / (1 - n * FP32_UNIT_ROUNDOFF)


def error_bound_factor(n: int) -> float:
    """c such that |A_j - L_j| <= c ||h|| ||w_j|| for the bf16 screen and dot products of
    length n: bf16 rounding of h, of w_j and of the result (3 u_bf16) plus fp32 accumulation of
    both the approximation and the exact logit (gamma_n each, bounded by n u_fp32 with room)."""
    return 3 * BF16_UNIT_ROUNDOFF + 3 * n * FP32_UNIT_ROUNDOFF


class Bf16Screen:
    """A = bf16(h) . bf16(W)^T; |A_j - L_j| <= ||h|| * terms[0, j] for every h."""

    def __init__(self, weight: torch.Tensor) -> None:
        low = weight.to(torch.bfloat16)
        # oneDNN's packed bf16 kernel where there is one (1.5x F.linear for few rows); torch's
        # generic bf16 kernel elsewhere (the same bits: the tests check both)
        self._low = prepack.PackedLinear(low, None, plain_rows=0) if fast_bf16() else partial(F.linear, weight=low)
        self.terms = (error_bound_factor(weight.size(1)) * weight.double().norm(dim=1).float())[None]

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, V], coef [R, 1]): the bound of A_j is sum_t coef[:, t] * terms[t, j]."""
        return self._low(hidden.to(torch.bfloat16)), hidden.norm(dim=1, keepdim=True)


class Int8Screen:
    """The weight as Q = round(W / s), one scale s_j = max|w_j| / 127 per row (a quarter of the
    fp32 bytes), read by the few_rows kernel. Bounds from the exact residual r_j = w_j - s_j q_j
    (computed in float64) rather than a worst case per element. Two ways to multiply:

    - AVX512-VNNI (kernel.vnni): the rows quantized too, h = s_h q_h + e_h (scale per row, e_h
      measured exactly), A = s_h s_j (q_h . q_j) with the integer sum exact and two fp32
      roundings after it:

        |A_j - L_j| <= (||e_h|| + gamma_n ||h||) ||w_j|| + s_h ||q_h|| (||r_j|| + 2.0001 u s_j ||q_j||)

      (e_h against w_j and q_h against r_j by Cauchy-Schwarz, the roundings of A, the exact
      logit's own fp32 sum); an int8 multiply-add does 4 products where fp32 does one, so 8
      rows are as fast as one (real-size text head: 6.1 vs 8.7 ms widened to fp32);
    - else A = (h . Q^T) * s in fp32 sums:

        |A_j - L_j| <= ||h|| (||r_j|| + s_j ||q_j|| (gamma_n + 2u) + gamma_n ||w_j||)

    Both as tight as the bf16 screen's on random rows (~1-2% vs ~1.2% of ||h|| ||w_j||), for
    half its bytes."""

    def __init__(self, weight: torch.Tensor, kernel, vnni: bool = True, chunk: int = 8192) -> None:
        scale, q, norms = [], [], []
        for w in weight.split(chunk):  # in float64 a chunk at a time (a whole head would be 1 GB)
            w = w.double()
            s = (w.abs().amax(1) / 127).float()
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: q = 0
            qc = torch.round(w / s.double()[:, None]).clamp_(-127, 127)
            residual = (w - s.double()[:, None] * qc).norm(dim=1)
            norms.append(torch.stack((w.norm(dim=1), residual, s.double() * qc.norm(dim=1))))
            scale.append(s)
            q.append(qc.to(torch.int8))
        w_norm, r_norm, sq_norm = torch.cat(norms, 1)
        self.scale, q = torch.cat(scale), torch.cat(q)
        self.n_out, self.k, self._kernel = weight.size(0), weight.size(1), kernel
        self.vnni = vnni and bool(getattr(kernel, "vnni", False))
        g, u = gamma(self.k), FP32_UNIT_ROUNDOFF
        up = lambda t: (t * (1 + 1e-6)).float()  # noqa: E731  (rounded up into fp32)
        if self.vnni:
            self.terms = torch.stack((up(w_norm), up(r_norm + 2.0001 * u * sq_norm)))
            self._gamma = g
            self._packed = kernel.pack_u8s8(q)
            self._colsum = q.int().sum(1, dtype=torch.int32)
            self._k_padded = 4 * self._packed.size(1)
        else:
            self.terms = up(r_norm + sq_norm * (g + 2 * u) + g * w_norm)[None]
            self._packed = kernel.pack(q)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, V], coef [R, T]): the bound of A_j is sum_t coef[:, t] * terms[t, j]."""
        if not self.vnni:
            return (self._kernel.int8_linear(hidden, self._packed, self.n_out, self.scale),
                    hidden.norm(dim=1, keepdim=True))
        xq, s_h, err, q_norm = self._kernel.quantize_rows(hidden, self._k_padded)
        approx = self._kernel.u8s8_linear(xq, s_h, self._packed, self.n_out, self._colsum, self.scale)
        h_norm = hidden.double().norm(dim=1)
        coef = torch.stack((err + self._gamma * h_norm, s_h.double() * q_norm), 1)
        return approx, (coef * (1 + 1e-6)).float()


class ScreenedArgmax:
    """argmax(h @ W^T) over `groups` equal groups of W's rows, for fp32 W [V, C], exact.

    int8: a few_rows kernel to screen calls of up to INT8_SCREEN_ROWS rows in int8 (None:
    every call screens through bf16); vnni: with AVX512-VNNI, quantize the rows too and screen
    up to INT8_VNNI_ROWS rows so (its looser bound leaves more candidates to recheck: worth it
    for the text head, whose 152,000 rows dominate, not for the audio heads' 7 x 4,160)."""

    def __init__(self, weight: torch.Tensor, groups: int = 1, int8=None, vnni: bool = True) -> None:
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.size(0) % groups:
            raise ValueError("ScreenedArgmax needs a 2-D fp32 weight whose rows split into equal groups")
        self.weight = weight.detach().contiguous()
        self.groups = groups
        self.bf16 = Bf16Screen(self.weight)
        self.int8 = None if int8 is None else Int8Screen(self.weight, int8, vnni)
        self.int8_rows = 0 if self.int8 is None else INT8_VNNI_ROWS if self.int8.vnni else INT8_SCREEN_ROWS
        # each screen's largest bound terms per group (the reach of the superset pass), once
        self._group_max_terms = {screen: screen.terms.view(screen.terms.size(0), groups, -1).amax(-1)
                                 for screen in (self.bf16, self.int8) if screen is not None}
        self.candidates = 0  # fp32 rows read in the last call (for tests and stats)

    def screen(self, rows: int):
        """The screen a call of `rows` rows takes."""
        return self.int8 if rows <= self.int8_rows else self.bf16

    def approximate(self, hidden: torch.Tensor) -> torch.Tensor:
        """Approximate logits [R, V] (bf16 or fp32 values) from the screen for R rows."""
        return self.screen(hidden.size(0))(hidden)[0]

    def bound(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, V]: the bound on |approximate - exact fp32 logit| this call uses, margin included."""
        screen = self.screen(hidden.size(0))
        return (BOUND_MARGIN * screen(hidden)[1]) @ screen.terms

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, C] fp32 -> ids [R] (one group) or [R, groups]."""
        R, V, G = hidden.size(0), self.weight.size(0), self.groups
        Vg = V // G
        shape = (R,) if G == 1 else (R, G)
        if R == 0:
            return torch.zeros(shape, dtype=torch.long, device=hidden.device)
        screen = self.screen(R)
        approx, coef = screen(hidden)
        approx = approx.view(R, G, Vg)  # compared exactly in fp32
        # slack of row j: sum_t coef_t * terms_t[j] (margin for the fp32 rounding of the
        # coefficients, the products and the sum included)
        coef = BOUND_MARGIN * coef  # [R, T]
        top = approx.amax(-1).float()  # [R, G]
        if not bool(torch.isfinite(top).all() and torch.isfinite(coef).all()):  # no bound holds
            self.candidates = V
            return F.linear(hidden, self.weight).view(R, G, Vg).argmax(-1).view(shape)
        # Some k has approx_k = top, so the largest fp32 logit is >= top - the group's largest
        # slack, and a candidate needs approx_j >= top - 2 * that: one cheap pass, a superset.
        reach = (coef @ self._group_max_terms[screen]).view(R, G, 1)
        cols = (approx >= top.view(R, G, 1) - 2 * reach).view(R, V).any(0).nonzero()[:, 0]
        # On that superset, the exact test: approx_j + slack_j >= max_k (approx_k - slack_k),
        # whose maximum lies inside the superset too.
        group = torch.div(cols, Vg, rounding_mode="floor").expand(R, -1)
        a = approx.view(R, V)[:, cols].float()
        slack = coef @ screen.terms[:, cols]  # [R, T] @ [T, U]
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
    """Whether this CPU has oneDNN's packed bf16 kernel (cpu/features.py: AVX-512 or AVX-NE-CONVERT)."""
    return prepack.available() and cpu_features.has("bf16")


def screen_heads_(lm, int8="auto") -> bool:
    """Give an fp32 CPU model screened greedy heads (lm.text_argmax / lm.audio_argmax), in
    place; returns whether it did. A runtime transform, like prepacking.

    int8: the few_rows kernel for the int8 screen, None for bf16 only, "auto": where it builds."""
    from omni2.model import tokens as tk

    weight = lm.lm_head.weight
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not fast_bf16()
            or getattr(lm, "screened_heads", False)):
        return False  # (without a fast bf16 kernel the screen would cost more than it saves)
    if int8 == "auto":
        from .few_rows import kernel

        int8 = kernel()
    with torch.no_grad():
        text = ScreenedArgmax(weight[tk.TEXT_SLICE], int8=int8)
        audio = ScreenedArgmax(weight[tk.PADDED_TEXT_VOCAB :], groups=tk.N_AUDIO_LAYERS, int8=int8, vnni=False)
    # instance attributes win over OmniLM's methods
    object.__setattr__(lm, "text_argmax", text)
    object.__setattr__(lm, "audio_argmax", audio)
    object.__setattr__(lm, "screened_heads", True)
    return True
