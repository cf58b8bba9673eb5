"""Prompt layouts of Mini-Omni2 (spec section 5), as id tensors plus feature placements.

Every turn runs as two rows: row 0 ends its audio streams with `answer_a` and produces the
speech; row 1 ends them with `pad_a` and produces the text. Ids here are *global* rows of the
shared embedding (audio ids already shifted per layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import tokens as tk

IMAGE_TOKENS = 50  # CLIP ViT-B/32: CLS + 7x7 patches


@dataclass
class Prompt:
    """ids [2, 8, T]; features: (name, start) -> which adapter fills positions start.. of row 0/1."""

    ids: torch.Tensor
    audio_start: Optional[int] = None
    audio_len: int = 0
    image_start: Optional[int] = None
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.ids.size(-1)

    def to_lists(self) -> list[list[list[int]]]:
        """[row][stream][pos] with audio streams as LOCAL ids (the `generate --json` shape)."""
        out = []
        for row in self.ids.tolist():
            streams = [[i - tk.to_global(0, a) for i in row[a]] for a in range(tk.N_AUDIO_LAYERS)]
            out.append(streams + [row[tk.TEXT_STREAM]])
        return out


def _audio_rows(body: list[int], last: int) -> list[list[int]]:
    """The 7 audio streams of one row: local ids `body + [last]` shifted into each layer."""
    return [[tk.to_global(i, a) for i in body + [last]] for a in range(tk.N_AUDIO_LAYERS)]


def _stack(rows: list[tuple[list[list[int]], list[int]]]) -> torch.Tensor:
    return torch.tensor([audio + [text] for audio, text in rows], dtype=torch.long)


def audio_question(n_frames: int) -> Prompt:
    """A1->A2: speech question of L whisper frames, answered in speech (length L + 3)."""
    L = n_frames
    audio = [tk.INPUT_A] + [tk.PAD_A] * L + [tk.EOA]
    text = [tk.INPUT_T] + [tk.PAD_T] * L + [tk.EOT, tk.ANSWER_T]
    ids = _stack([(_audio_rows(audio, tk.ANSWER_A), text), (_audio_rows(audio, tk.PAD_A), text)])
    return Prompt(ids=ids, audio_start=1, audio_len=L, meta={"layout": "audio"})


def image_audio_question(n_frames: int) -> Prompt:
    """Image + speech question (length L + 55). Whisper features start at 52, not 53: the
    released model was trained with this shift (it covers `input_a`), so it is kept."""
    L = n_frames
    audio = [tk.IMAGE] + [tk.PAD_A] * IMAGE_TOKENS + [tk.EOIMAGE, tk.INPUT_A] + [tk.PAD_A] * L + [tk.EOA]
    text = [tk.PAD_T] * (L + IMAGE_TOKENS + 4) + [tk.ANSWER_T]
    ids = _stack([(_audio_rows(audio, tk.ANSWER_A), text), (_audio_rows(audio, tk.PAD_A), text)])
    return Prompt(ids=ids, audio_start=IMAGE_TOKENS + 2, audio_len=L, image_start=1, meta={"layout": "image+audio"})


def text_question(text_ids: list[int]) -> Prompt:
    """T1->A2 (text question, spoken answer), the release's `get_input_ids_TA` layout."""
    n = len(text_ids)
    audio = [tk.PAD_A] * (n + 2)
    text = [tk.INPUT_T] + list(text_ids) + [tk.EOT, tk.ANSWER_T]
    ids = _stack([(_audio_rows(audio, tk.ANSWER_A), text), (_audio_rows(audio, tk.PAD_A), text)])
    return Prompt(ids=ids, meta={"layout": "text"})


def context_text(text_ids: list[int]) -> Prompt:
    """Text the model reads but does not answer (a system message): the typed question's
    layout without the answer marker, `input_t ... eot` (length n + 2)."""
    n = len(text_ids)
    text = [tk.INPUT_T] + list(text_ids) + [tk.EOT]
    rows = (_audio_rows([tk.PAD_A] * (n + 1), tk.PAD_A), text)
    return Prompt(ids=_stack([rows, rows]), meta={"layout": "context"})


def assistant_text(text_ids: list[int]) -> Prompt:
    """Words the assistant said, given as text (a client-created assistant item): the steps
    of a text-only answer, `ids ... eot` on the text stream, pad on every audio stream
    (length n + 1). It follows a question's answer marker like a generated answer does."""
    n = len(text_ids)
    rows = (_audio_rows([tk.PAD_A] * n, tk.PAD_A), list(text_ids) + [tk.EOT])
    return Prompt(ids=_stack([rows, rows]), meta={"layout": "assistant"})


def step_ids(audio_tokens: torch.Tensor, text_token: torch.Tensor) -> torch.Tensor:
    """Ids fed back after a step, [B, 2, 8]: row 0 gets the 7 sampled audio tokens, row 1
    gets pad_a on every layer; both get the same text token.

    audio_tokens [B, 7] local ids, text_token [B]."""
    B = audio_tokens.size(0)
    shift = torch.tensor([tk.to_global(0, a) for a in range(tk.N_AUDIO_LAYERS)], device=audio_tokens.device)
    row0 = torch.cat([audio_tokens + shift, text_token[:, None]], dim=1)
    row1 = torch.cat([(tk.PAD_A + shift).expand(B, -1), text_token[:, None]], dim=1)
    return torch.stack([row0, row1], dim=1)
