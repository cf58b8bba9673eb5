"""How Mini-Omni2's 7 audio streams map onto SNAC 24 kHz codes (spec sections 6 and 7).

Two facts live here, both pure index arithmetic:

* Frame layout. One *frame* is 7 local audio ids, one per audio layer, covering 4 positions of
  SNAC's finest codebook (2,048 samples, 85.33 ms). Frame t holds
  ``c0[t], c1[2t], c2[4t], c2[4t+1], c1[2t+1], c2[4t+2], c2[4t+3]`` on layers 0..6.
* Delay pattern. The LM emits one row of 7 tokens per decode step (step 0 comes from the
  prefill). Layer a's token of frame t is emitted at step t+a+1, so frame t is complete at step
  t+7. Nothing is forced on the audio layers (the released model emits ``pad_a`` in the early
  steps by itself); we only *read* the layers with the right offsets, exactly as the reference
  does when it turns tokens into sound.

Special ids (>= 4096: ``eoa``, ``pad_a``, ...) have no SNAC code. The trained model does not put
them inside a frame, but random/tiny models do, and a bad id would crash the codebook lookup of
the audio decoder in the middle of a turn. `sanitize_frames` therefore maps them to code 0 and
reports how many there were, so callers can count them in metrics rather than crash.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import tokens

FRAME_TOKENS = tokens.N_AUDIO_LAYERS  # 7 audio ids per frame
CODES_PER_FRAME = (1, 2, 4)  # positions of c0, c1, c2 in one frame (SNAC vq_strides [4, 2, 1])
SAMPLES_PER_FRAME = 2048  # 4 finest-code positions x hop 512
SAMPLE_RATE = 24_000

# For each audio layer: (codebook, position of that code inside the frame).
LAYER_TO_CODE = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))

Steps = Union[Sequence[Sequence[int]], torch.Tensor]


def _as_batched(frames: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if frames.dim() == 2:
        return frames.unsqueeze(0), True
    if frames.dim() == 3:
        return frames, False
    raise ValueError(f"frames must be [T,7] or [B,T,7], got shape {tuple(frames.shape)}")


def frames_to_codes(frames: torch.Tensor) -> list[torch.Tensor]:
    """[T,7] or [B,T,7] frames -> SNAC codes [c0 [B,T], c1 [B,2T], c2 [B,4T]] (B=1 for [T,7])."""
    batched, _ = _as_batched(frames)
    if batched.shape[-1] != FRAME_TOKENS:
        raise ValueError(f"a frame has {FRAME_TOKENS} tokens, got last dim {batched.shape[-1]}")
    b, t, _ = batched.shape
    codes = [batched.new_empty((b, t, n)) for n in CODES_PER_FRAME]
    for layer, (book, pos) in enumerate(LAYER_TO_CODE):
        codes[book][:, :, pos] = batched[:, :, layer]
    # [B, T, n] -> [B, n*T]: code position n*t + pos belongs to frame t.
    return [c.reshape(b, -1) for c in codes]


def codes_to_frames(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `frames_to_codes`: [c0 [B,T], c1 [B,2T], c2 [B,4T]] -> [B,T,7]."""
    if len(codes) != len(CODES_PER_FRAME):
        raise ValueError(f"expected {len(CODES_PER_FRAME)} codebooks, got {len(codes)}")
    codes = [c.unsqueeze(0) if c.dim() == 1 else c for c in codes]
    b, t = codes[0].shape
    for c, n in zip(codes, CODES_PER_FRAME):
        if tuple(c.shape) != (b, n * t):
            raise ValueError(f"codebook shapes {[tuple(c.shape) for c in codes]} are not T, 2T, 4T")
    per_frame = [c.reshape(b, t, n) for c, n in zip(codes, CODES_PER_FRAME)]
    frames = codes[0].new_empty((b, t, FRAME_TOKENS))
    for layer, (book, pos) in enumerate(LAYER_TO_CODE):
        frames[:, :, layer] = per_frame[book][:, :, pos]
    return frames


def frames_from_steps(steps: Steps) -> torch.Tensor:
    """Per-step rows of 7 audio tokens [S,7] -> frames [F,7], F = max(0, S-7).

    Frame t takes layer a from step t+a+1. A frame is only returned once all 7 of its layers
    exist (the last layer of frame t arrives at step t+7), so S steps give S-7 frames.
    """
    rows = torch.as_tensor(steps, dtype=torch.long)
    if rows.numel() == 0:
        return torch.zeros((0, FRAME_TOKENS), dtype=torch.long)
    if rows.dim() != 2 or rows.shape[1] != FRAME_TOKENS:
        raise ValueError(f"steps must be [S,{FRAME_TOKENS}], got shape {tuple(rows.shape)}")
    n_frames = max(0, rows.shape[0] - FRAME_TOKENS)
    frames = torch.empty((n_frames, FRAME_TOKENS), dtype=torch.long)
    for a in range(FRAME_TOKENS):
        frames[:, a] = rows[a + 1 : a + 1 + n_frames, a]
    return frames


def steps_heard(samples: int) -> int:
    """Decode steps of an answer whose every audio token belongs to a frame the listener heard
    in full, given `samples` (24 kHz) played: the frames F = samples // 2048, and steps 0..F
    (step s holds layer a of frame s-a-1, so a later step holds a token of an unheard frame).
    0 when no frame was heard: nothing of the answer reached the user."""
    frames = max(0, int(samples)) // SAMPLES_PER_FRAME
    return frames + 1 if frames else 0


class FrameAssembler:
    """Incremental `frames_from_steps`: feed one 7-token step at a time, get frames as they complete.

    Frame t completes at step t+7 (its layer-6 token), so `push` of step s returns frame s-7
    for s >= 7 and None before. Only the last 7 steps are kept.
    """

    def __init__(self) -> None:
        self._recent: list[list[int]] = []  # the last FRAME_TOKENS steps, oldest first
        self.n_steps = 0

    @property
    def n_frames(self) -> int:
        return max(0, self.n_steps - FRAME_TOKENS)

    def push(self, step: Sequence[int] | torch.Tensor) -> Optional[torch.Tensor]:
        row = [int(x) for x in (step.tolist() if isinstance(step, torch.Tensor) else step)]
        if len(row) != FRAME_TOKENS:
            raise ValueError(f"a step has {FRAME_TOKENS} audio tokens, got {len(row)}")
        self._recent.append(row)
        self.n_steps += 1
        if len(self._recent) <= FRAME_TOKENS:
            return None
        # Window = steps s-7 .. s; frame s-7 takes layer a from step (s-7)+a+1 = window[a+1].
        frame = torch.tensor([self._recent[a + 1][a] for a in range(FRAME_TOKENS)], dtype=torch.long)
        self._recent.pop(0)
        return frame


def sanitize_frames(frames: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map ids SNAC cannot decode (specials >= 4096, or negatives) to code 0; return (frames, n_bad).

    The trained model should never emit a special inside a frame; tiny random models do. We
    replace instead of raising so a turn keeps streaming, and return the count for metrics.
    """
    bad = (frames < 0) | (frames >= tokens.SNAC_CODEBOOK)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return frames, 0
    return frames.masked_fill(bad, 0), n_bad
