"""Session slots: the host-side state of one conversation and its two KV-cache rows.

A session owns slot i (cache rows 2i = the speaking row, 2i+1 = the writing row) for its
whole life, so its context survives between turns. Everything here is plain Python: the
step loop reads it to build each batched step without asking the device anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from omni2.model import tokens as tk
from omni2.model.generate import EndRules
from omni2.model.lm import KVCache, apply_rope
from omni2.model.snac_layout import FrameAssembler

from .messages import Turn

# HELD: a speculative turn whose prompt is prefilled and step 0 sampled, waiting for release.
IDLE, PREFILL, HELD, DECODE = "idle", "prefill", "held", "decode"


@dataclass
class Slot:
    index: int
    session: Optional[str] = None
    ctx: int = 0  # positions of context held in the cache rows
    turn_starts: list[int] = field(default_factory=list)  # where each past turn began
    phase: str = IDLE
    turn: Optional[Turn] = None
    # current turn
    embeds: Optional[torch.Tensor] = None  # [2, T, C] prompt embeddings, dropped after prefill
    prompt_len: int = 0
    prefilled: int = 0
    start: int = 0  # cache position of the prompt's first token
    written: int = 0  # cache positions [0, written) hold this conversation
    step: int = 0
    max_steps: int = 0
    rules: EndRules = field(default_factory=EndRules)
    assembler: FrameAssembler = field(default_factory=FrameAssembler)
    text_decoder: object = None
    text_ids: list[int] = field(default_factory=list)
    audio_ids: list[list[int]] = field(default_factory=list)  # only with record_tokens
    next_ids: Optional[list[list[int]]] = None  # [2][8] ids to feed at the next step
    first: Optional[tuple[list[int], int]] = None  # step 0's (audio, text) while HELD
    frames: list[torch.Tensor] = field(default_factory=list)  # completed, not yet sent to vocoder
    n_frames: int = 0
    prefill_s: float = 0.0
    decode_started_at: float = 0.0
    closing: bool = False  # session closed while a turn was live: release at the next boundary
    # the last turn that ended into the context, and where its answer's positions begin
    last_turn: Optional[Turn] = None
    answer_start: int = 0
    pending_cut: Optional[tuple[Turn, int]] = None  # (turn, answer steps to keep), see cut_answer

    @property
    def rows(self) -> tuple[int, int]:
        return 2 * self.index, 2 * self.index + 1

    @property
    def position(self) -> int:
        """Where this slot's rows write in a batched decode step: the fed token's position
        while speaking, else the first position not written yet (harmless to scribble on:
        it is rewritten before anything reads it)."""
        if self.phase == DECODE:
            return self.start + self.prompt_len + self.step - 1
        if self.phase in (PREFILL, HELD):
            return self.written
        return self.ctx

    def begin(self, turn: Turn, embeds: torch.Tensor, max_steps: int, text_decoder) -> None:
        self.turn = turn
        self.phase = PREFILL
        self.embeds = embeds
        self.prompt_len = int(embeds.shape[1])
        self.prefilled = 0
        self.start = self.ctx
        self.written = self.ctx
        self.turn_starts.append(self.ctx)
        self.step = 0
        self.max_steps = max_steps
        self.rules = EndRules()
        self.assembler = FrameAssembler()
        self.text_decoder = text_decoder
        self.text_ids = []
        self.audio_ids = []
        self.next_ids = None
        self.first = None
        self.frames = []
        self.n_frames = 0

    def end_turn(self) -> None:
        """Keep what the cache holds of this turn as context; forget the turn's state."""
        if self.phase != IDLE:
            self.ctx = self.written
            self.last_turn, self.answer_start = self.turn, self.start + self.prompt_len
        self.phase = IDLE
        self.turn = None
        self.embeds = None
        self.next_ids = None
        self.first = None

    def forget_turn(self) -> None:
        """Drop the current turn from the context entirely (a speculation that was not used):
        the positions it wrote become free again."""
        last = (self.last_turn, self.answer_start)
        if self.phase != IDLE:
            self.written = self.start
            if self.turn_starts and self.turn_starts[-1] == self.start:
                self.turn_starts.pop()
        self.end_turn()
        self.last_turn, self.answer_start = last

    def cut_answer(self, turn: Turn, steps: int) -> bool:
        """Keep only the first `steps` answer positions of `turn` in the context (the part the
        user heard), if `turn` is over and is still this conversation's last turn; returns
        whether it did. Both rows of a step share its position, so a step is kept or dropped
        whole: its 7 audio tokens and its text token."""
        if self.phase != IDLE or turn is not self.last_turn:
            return False
        self.ctx = min(self.ctx, self.answer_start + max(0, steps))
        return True

    def release(self) -> None:
        self.end_turn()
        self.session = None
        self.ctx = 0
        self.turn_starts = []
        self.last_turn, self.pending_cut = None, None


def make_room(cache: KVCache, slot: Slot, need: int, limit: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> int:
    """Forget the slot's oldest whole turns until `need` more positions fit; returns how many
    positions were dropped (0 if it already fits).

    Keys were stored rotated by their absolute position; moving them d positions earlier
    means rotating them by -d, which RoPE allows exactly (rotations compose), so the kept
    context attends as if it had always started at 0.
    """
    if slot.ctx + need <= limit:
        return 0
    drop = 0
    for start in slot.turn_starts[1:] + [slot.ctx]:
        drop = start
        if slot.ctx - drop + need <= limit:
            break
    keep = slot.ctx - drop
    rows = list(slot.rows)
    if keep > 0:
        cos = rope_cos[drop : drop + 1].to(cache.k.dtype)  # rotation by +drop; invert via -sin
        sin = -rope_sin[drop : drop + 1].to(cache.k.dtype)
        for r in rows:
            k = cache.k[:, r, :, drop : drop + keep]
            cache.k[:, r, :, :keep] = apply_rope(k, cos, sin)
            cache.v[:, r, :, :keep] = cache.v[:, r, :, drop : drop + keep].clone()
    slot.turn_starts = [s - drop for s in slot.turn_starts if s >= drop]
    slot.ctx = keep
    return drop


def feed_ids(audio: list[int], text: int) -> list[list[int]]:
    """Global ids fed back after a step: row 0 its 7 audio tokens, row 1 pad_a; same text."""
    row0 = [tk.to_global(a, layer) for layer, a in enumerate(audio)] + [text]
    row1 = [tk.to_global(tk.PAD_A, layer) for layer in range(tk.N_AUDIO_LAYERS)] + [text]
    return [row0, row1]


IDLE_IDS = feed_ids([tk.PAD_A] * tk.N_AUDIO_LAYERS, tk.PAD_T)
