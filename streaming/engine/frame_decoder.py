"""Streaming SNAC decoder: frames in, click-free 24 kHz audio out, equal to a one-shot decode.

The reference decodes every 4 frames on their own. SNAC's decoder is a stack of non-causal
convolutions, so a sample depends on codes up to ~2.3 frames before *and after* it: decoding
groups independently zero-pads both sides of every join (audible clicks), and the last frames
that do not fill a group are never played.

`FrameDecoder` instead keeps a sliding window over the utterance:

* left context: each decode re-decodes `context_frames` frames before the first sample it still
  has to emit, so the convolutions see the real past instead of zero padding;
* hold-back: the last `hold_back` samples of a window still depend on frames not generated yet,
  so they are emitted by the next window (or by `flush`, where the utterance end is real).

Both numbers come from `receptive_field`, an exact interval walk over the decoder's
convolutions (checked empirically in tests/test_snac.py). For the 24 kHz architecture (the
released widths and the tiny test codec alike, as the walk depends only on kernels, strides
and dilations): a sample can depend on intermediate values reaching 5,268 samples to its left
and 5,268 to its right, so hold_back = 5268 samples (220 ms) and context_frames = 3. (Perturbing
one code changes outputs by > 1e-6 only within ~4,600 samples; a hold-back of 4,000 already
breaks the 1e-3 bar on the real-size architecture, 8e-4 / 2e-4 tiny, 2,048 gives ~2e-2.)
Steady-state window for group 4: 3 context + 3 held-back/partial + 4 new = 10 frames. The first
audio of a turn (2,924 samples) is final as soon as 4 frames exist. With `window_frames` W
(the engine's audio_window_frames, 24), every window of an utterance of at least W frames is W
wide (~W - 5.6 new frames), whether the decoder is behind or not, so the windows of all
sessions can share one batched SNAC call.
With deterministic noise (snac_codec's "positional" or "zero" mode) the concatenated output
equals `decode_frames` of the whole utterance up to float rounding.

The engine can batch sessions: `next_window()` on each session's decoder, one
`decode_groups(...)` call for all of them, then `accept(window, audio)` on each. `push` and
`flush` do exactly that for a single session.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from omni2.model.snac_codec import decode_frames
from omni2.model.snac_layout import FRAME_TOKENS, SAMPLES_PER_FRAME, sanitize_frames

EMPTY = np.zeros(0, dtype=np.float32)


# ---- receptive field -----------------------------------------------------------------------

def _ops(module: nn.Module) -> list:
    """The decoder's position-changing ops in forward order: ("conv", k, d, p), ("convT", k, s, p),
    ("res", inner_ops) for residual units (output = input + inner(input)). Others are pointwise."""
    if isinstance(module, nn.ConvTranspose1d):
        return [("convT", module.kernel_size[0], module.stride[0], module.padding[0])]
    if isinstance(module, nn.Conv1d):
        if module.stride[0] != 1:
            raise ValueError("strided convolution in the SNAC decoder: receptive_field does not model it")
        return [("conv", module.kernel_size[0], module.dilation[0], module.padding[0])]
    if type(module).__name__ == "ResidualUnit":
        return [("res", _ops(module.block))]
    if type(module).__name__ == "LocalMHA":
        raise ValueError("decoder has windowed attention: no finite per-sample receptive field")
    out = []
    for child in module.children():
        out += _ops(child)
    return out


def _walk_back(ops: list, lo: int, hi: int, ppf: float, lows: list, highs: list) -> tuple[int, int, float]:
    """Map the interval [lo, hi] of positions (ppf positions per frame) back through `ops`,
    recording every layer's interval in output samples (what a window must contain exactly)."""
    for op in reversed(ops):
        if op[0] == "conv":
            _, k, d, p = op
            lo, hi = lo - p, hi - p + d * (k - 1)
        elif op[0] == "convT":
            _, k, s, p = op
            lo, hi = math.ceil((lo + p - k + 1) / s), math.floor((hi + p) / s)
            ppf = ppf / s
        else:
            ilo, ihi, ippf = _walk_back(op[1], lo, hi, ppf, lows, highs)
            lo, hi, ppf = min(lo, ilo), max(hi, ihi), ippf
        lows.append(lo * SAMPLES_PER_FRAME / ppf)
        highs.append((hi + 1) * SAMPLES_PER_FRAME / ppf)
    return lo, hi, ppf


def receptive_field(snac: nn.Module) -> tuple[int, int]:
    """(left, right) in samples: output sample p is exact in a window of frames [s, e) iff
    s*2048 <= p - left and p + 1 + right <= e*2048 (every intermediate layer's input that p
    depends on lies inside the window, so zero padding at the window edges never reaches it)."""
    ops = _ops(snac.decoder)
    left = right = 0
    base = 1000 * SAMPLES_PER_FRAME  # far from the utterance start; all phases of one frame
    for p in range(base, base + SAMPLES_PER_FRAME):
        lows, highs = [], []
        _walk_back(ops, p, p, float(SAMPLES_PER_FRAME), lows, highs)
        left = max(left, p - math.floor(min(lows)))
        right = max(right, math.ceil(max(highs)) - p - 1)
    return left, right


# ---- batched window decode -----------------------------------------------------------------

@dataclass(frozen=True)
class DecodeWindow:
    """One decode call's worth of one utterance: frames [n,7] starting at absolute `start_frame`;
    samples [keep_from, keep_to) of its output (window-relative) are final and get emitted."""

    frames: torch.Tensor
    start_frame: int = 0
    keep_from: int = 0
    keep_to: Optional[int] = None
    pad: int = 0  # filler frames at the end (only samples they cannot reach are kept)


WindowLike = Union[DecodeWindow, torch.Tensor]


def decode_groups(snac: nn.Module, windows: Sequence[WindowLike]) -> list[np.ndarray]:
    """Decode several sessions' windows with as few batched SNAC calls as possible.

    Returns each window's full audio (n*2048 float32 samples). Windows of equal length share one
    call; different lengths go in separate calls rather than being padded, because padding
    frames would change the samples near the padded edge (the decoder is non-causal) and the
    result must equal decoding each session alone.
    """
    wins = [w if isinstance(w, DecodeWindow) else DecodeWindow(frames=w) for w in windows]
    out: list[Optional[np.ndarray]] = [None] * len(wins)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(wins):
        if w.frames.dim() != 2 or w.frames.shape[1] != FRAME_TOKENS or w.frames.shape[0] == 0:
            raise ValueError(f"window {i}: frames must be [n>0,{FRAME_TOKENS}], got {tuple(w.frames.shape)}")
        by_len.setdefault(int(w.frames.shape[0]), []).append(i)
    for idx in by_len.values():
        frames = torch.stack([wins[i].frames for i in idx])
        audio = decode_frames(snac, frames, [wins[i].start_frame for i in idx])
        audio = audio.float().cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = audio[row]
    return out  # type: ignore[return-value]


# ---- one utterance ----------------------------------------------------------------------------

class FrameDecoder:
    """Streaming decoder for one utterance (one turn's speech).

    `push(frames)` returns the samples that are now final (possibly none); `flush()` returns the
    rest at the end of the utterance. `group_frames` new frames trigger a decode (latency vs.
    compute: every decode re-decodes ~6 frames of context and hold-back). `context_frames` and
    `hold_back` default to the exact values from `receptive_field`; smaller values trade
    exactness for latency/compute.
    """

    def __init__(
        self,
        snac: nn.Module,
        group_frames: int = 4,
        context_frames: Optional[int] = None,
        hold_back: Optional[int] = None,
        window_frames: Optional[int] = None,
    ):
        if group_frames < 1:
            raise ValueError("group_frames must be >= 1")
        self.snac = snac
        self.group_frames = group_frames
        if context_frames is None or hold_back is None:
            left, right = _cached_field(snac)
            context_frames = math.ceil(left / SAMPLES_PER_FRAME) if context_frames is None else context_frames
            hold_back = right if hold_back is None else hold_back
        if context_frames < 0 or hold_back < 0:
            raise ValueError("context_frames and hold_back must be >= 0")
        self.context_frames = context_frames
        self.hold_back = hold_back
        if window_frames is not None and window_frames * SAMPLES_PER_FRAME <= (
                (context_frames + 1) * SAMPLES_PER_FRAME + hold_back):
            raise ValueError(f"window_frames={window_frames} leaves no new sample after {context_frames} "
                             f"context frames and {hold_back} held-back samples")
        self.window_frames = window_frames
        self.reset()

    def reset(self) -> None:
        self._frames = torch.zeros((0, FRAME_TOKENS), dtype=torch.long)  # kept tail of the utterance
        self._first = 0  # absolute index of self._frames[0]
        self.n_frames = 0  # frames received
        self._decoded_through = 0  # frames covered by the last decode
        self.emitted = 0  # samples emitted
        self.n_bad_codes = 0  # special ids replaced by code 0 (see sanitize_frames)
        self.finished = False

    # -- planning (no tensors computed) --
    def pending_frames(self) -> int:
        return self.n_frames - self._decoded_through

    def next_window(self, final: bool = False) -> Optional[DecodeWindow]:
        """The window to decode now, or None when there is nothing to do yet.

        Not final: only once `group_frames` new frames wait. Final: whatever is not emitted yet.
        With `window_frames` (W), every window is exactly W frames wide, so the windows of all
        sessions share one batched SNAC call: when more than W frames wait, the first W are
        decoded (their held-back tail stays for the next window); when fewer, the window starts
        earlier than the context needs (more real past changes no sample: still exact), and
        while the utterance itself is shorter than W, code-0 frames fill the window's end (the
        samples kept end `hold_back` before the last real frame: no filler reaches them). Only
        the final window of an utterance shorter than W is narrower (its real end is kept).
        """
        total = self.n_frames * SAMPLES_PER_FRAME
        start = max(0, self.emitted // SAMPLES_PER_FRAME - self.context_frames)
        start = max(start, self._first)  # only reachable when context_frames grew after reset
        width = self.window_frames
        if width is not None and self.n_frames - start > width:
            stop = start + width
            end = stop * SAMPLES_PER_FRAME - self.hold_back
        else:
            if final:
                end = total
            else:
                if self.pending_frames() < self.group_frames:
                    return None
                end = total - self.hold_back
            stop = self.n_frames
            if width is not None:
                start = max(self._first, min(start, stop - width))
        if end <= self.emitted:
            return None
        frames = self._frames[start - self._first : stop - self._first]
        pad = 0
        if width is not None and not final and frames.shape[0] < width:
            pad = width - int(frames.shape[0])
            frames = torch.cat([frames, frames.new_zeros((pad, FRAME_TOKENS))])
        offset = start * SAMPLES_PER_FRAME
        return DecodeWindow(frames=frames, start_frame=start, keep_from=self.emitted - offset, keep_to=end - offset,
                            pad=pad)

    def accept(self, window: DecodeWindow, audio: np.ndarray) -> np.ndarray:
        """Take a decoded window's audio; return the newly final samples, advance the state."""
        if window.start_frame * SAMPLES_PER_FRAME + window.keep_from != self.emitted:
            raise RuntimeError("FrameDecoder.accept: window does not continue the emitted audio (stale window?)")
        chunk = np.ascontiguousarray(audio[window.keep_from : window.keep_to], dtype=np.float32)
        self.emitted += len(chunk)
        self._decoded_through = window.start_frame + int(window.frames.shape[0]) - window.pad
        self._trim()
        return chunk

    def _trim(self) -> None:
        # Keep only what the next window can reach: context before the first unemitted frame
        # (and a whole window before it, as a fixed-width window may start that early).
        keep_from = max(0, self.emitted // SAMPLES_PER_FRAME - self.context_frames - (self.window_frames or 0))
        if keep_from > self._first:
            self._frames = self._frames[keep_from - self._first :]
            self._first = keep_from

    # -- single-session convenience --
    def append(self, frames: torch.Tensor) -> None:
        if self.finished:
            raise RuntimeError("FrameDecoder: push after flush (call reset() for a new utterance)")
        frames = torch.as_tensor(frames, dtype=torch.long).reshape(-1, FRAME_TOKENS).cpu()
        frames, bad = sanitize_frames(frames)
        self.n_bad_codes += bad
        self._frames = torch.cat([self._frames, frames])
        self.n_frames += int(frames.shape[0])

    def push(self, frames: torch.Tensor) -> np.ndarray:
        """Add frames [n,7]; return newly final float32 samples (maybe empty)."""
        self.append(frames)
        return self._run(final=False)

    def flush(self) -> np.ndarray:
        """End of the utterance: return every remaining sample, tail included."""
        out = self._run(final=True)
        self.finished = True
        return out

    def _run(self, final: bool) -> np.ndarray:
        window = self.next_window(final=final)
        if window is None:
            return EMPTY.copy()
        (audio,) = decode_groups(self.snac, [window])
        return self.accept(window, audio)


def _cached_field(snac: nn.Module) -> tuple[int, int]:
    field = getattr(snac, "_omni2_receptive_field", None)
    if field is None:
        field = receptive_field(snac)
        snac._omni2_receptive_field = field
    return field
