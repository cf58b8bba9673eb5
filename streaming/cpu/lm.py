"""OmniLM on the CPU fast path: the model the CPU's entry (accelerate.py) hands the engine.

Same weights, same tokens (tests/test_prepack.py, test_screened_argmax.py); what runs
differently is all here or visible in the module tree (print(lm)):
- the blocks' matrices are prepack.PackedLinear and, for fp32, their attention is
  decode_attention.DecodeAttention (modules replaced in place, as any nn.Module swap);
- the output heads below: packed copies of lm_head's text and audio slices, and for an fp32
  model exact greedy picks screened through a low-precision copy (screened_argmax.py).
`AcceleratedLM.of(lm)` turns a loaded OmniLM into one in place (no weights are copied); each
part is filled in by the transform that builds it and stays None until then.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from omni2.model import tokens as tk
from omni2.model.lm import OmniLM


class AcceleratedLM(OmniLM):
    packed_text: Optional[nn.Module]     # lm_head's text rows, packed (prepack.py)
    packed_audio: Optional[nn.Module]    # its audio rows, packed
    screened_text: Optional[object]      # greedy text pick (screened_argmax.ScreenedArgmax)
    screened_audio: Optional[object]     # greedy audio picks, one per layer

    @property
    def prepacked(self) -> bool:
        return self.packed_text is not None

    @property
    def screened_heads(self) -> bool:
        return self.screened_text is not None

    @classmethod
    def of(cls, lm: OmniLM) -> "AcceleratedLM":
        """lm itself, now an AcceleratedLM that still runs exactly as OmniLM until a CPU
        transform fills a part in."""
        if not isinstance(lm, cls):
            lm.__class__ = cls
            lm.packed_text = lm.packed_audio = None
            lm.screened_text = lm.screened_audio = None
        return lm

    # each part, where it is filled in, replaces OmniLM's own computation of the same thing
    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.packed_text or super().text_logits)(hidden)

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_audio is None:
            return super().audio_logits(hidden)
        return self.packed_audio(hidden).unflatten(-1, (tk.N_AUDIO_LAYERS, tk.PADDED_AUDIO_VOCAB))

    def text_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.screened_text or super().text_argmax)(hidden)

    def audio_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.screened_audio or super().audio_argmax)(hidden)
