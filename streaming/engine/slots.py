"""Session slots: the host-side state of one conversation and its two KV-cache rows.

A session owns slot i (cache rows 2i = the speaking row, 2i+1 = the writing row) for its
whole life, so its context survives between turns. Everything here is plain Python: the
step loop reads it to build each batched step without asking the device anything.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from omni2.model import tokens as tk
from omni2.model.generate import EndRules
from omni2.model.lm import KVCache, apply_rope
from omni2.model.snac_layout import FrameAssembler

from .messages import Turn

# HELD: a speculative turn whose prompt is prefilled and step 0 sampled, waiting for release.
# REBUILD: re-prefilling the turns that followed a forgotten one (no turn is live).
IDLE, PREFILL, HELD, DECODE, REBUILD = "idle", "prefill", "held", "decode", "rebuild"
FORGET_PARTS = ("all", "prompt", "answer")


@dataclass
class TurnRecord:
    """One past turn of the context, kept so it can be replayed at another position: its
    prompt embeddings [2, T, C] (on the device) and the ids fed at each decode step."""

    start: int                                   # cache position of its first token
    turn_id: int = 0
    prompt: Optional[torch.Tensor] = None        # None: no prompt positions (forgotten)
    fed: list = field(default_factory=list)      # [2][8] global ids per written answer step

    @property
    def prompt_len(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[1])

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.fed)

    def embeds(self, embed: Callable[[torch.Tensor], torch.Tensor], device) -> list[torch.Tensor]:
        parts = [] if self.prompt is None else [self.prompt]
        if self.fed:
            ids = torch.tensor(self.fed, device=device)  # [n, 2, 8]
            parts.append(embed(ids.permute(1, 2, 0)))
        return parts


@dataclass
class Slot:
    index: int
    session: Optional[str] = None
    ctx: int = 0  # positions of context held in the cache rows
    records: list[TurnRecord] = field(default_factory=list)  # the context's turns, in order
    phase: str = IDLE
    turn: Optional[Turn] = None
    # current turn
    embeds: Optional[torch.Tensor] = None  # [2, T, C] being prefilled (the turn's record keeps them)
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
    # wall time of the prefill calls this prompt took part in: a call shared by k prompts counts
    # whole for each (it is how long the prompt's prefill kept its answer waiting, not its share
    # of the compute), so 8 prompts prefilled together each report the whole call
    prefill_s: float = 0.0
    decode_started_at: float = 0.0
    order: int = 0  # when its prompt was admitted: prompts are prefilled oldest first
    closing: bool = False  # session closed while a turn was live: release at the next boundary
    # turns and Forget edits that wait for this slot (a live answer, a rebuild), in order
    waiting: collections.deque = field(default_factory=collections.deque)

    @property
    def turn_starts(self) -> list[int]:
        return [r.start for r in self.records]

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
        if self.phase in (PREFILL, HELD, REBUILD):
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
        self.records.append(TurnRecord(self.ctx, turn.id, embeds))
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
        rec = self.records[-1] if self.records else None
        if self.phase == PREFILL and rec is not None and rec.start == self.start:
            # cut short: only part of its prompt is in the cache
            rec.prompt = rec.prompt[:, : self.written - self.start] if self.written > self.start else None
            if rec.length == 0:
                self.records.pop()
        if self.phase != IDLE:
            self.ctx = self.written
        self.phase = IDLE
        self.turn = None
        self.embeds = None
        self.next_ids = None
        self.first = None

    def forget_turn(self) -> None:
        """Drop the current turn from the context entirely (a speculation that was not used):
        the positions it wrote become free again."""
        if self.phase != IDLE:
            self.written = self.start
            if self.records and self.records[-1].start == self.start:
                self.records.pop()
        self.end_turn()

    def release(self) -> None:
        self.end_turn()
        self.session = None
        self.ctx = 0
        self.records = []

    def begin_rebuild(self, embeds: torch.Tensor) -> None:
        """Re-prefill `embeds` at ctx.. (the turns after a forgotten one), chunk by chunk."""
        self.phase = REBUILD
        self.embeds = embeds
        self.prompt_len = int(embeds.shape[1])
        self.prefilled = 0
        self.start = self.written = self.ctx

    def end_rebuild(self) -> None:
        """Done (or given up): the context is what has been re-prefilled; turns that did not
        make it back in are gone."""
        self.ctx = self.written
        self.records = [r for r in self.records if r.start + r.length <= self.ctx]
        self.phase = IDLE
        self.embeds = None


def forget(slot: Slot, turn_id: int, part: str, embed: Callable[[torch.Tensor], torch.Tensor],
           device, keep_steps: int = 0) -> Optional[torch.Tensor]:
    """Remove `part` of the slot's past turn `turn_id` from its context (the slot is idle).

    The cache stays valid up to the first position that changes, so ctx moves back there;
    returns the embeddings of everything after it (the turn's kept part, then every later
    turn, at their new positions) to re-prefill, or None when nothing follows. An unknown
    turn (never admitted, or already dropped by make_room) is a no-op. part "answer" keeps
    the answer's first `keep_steps` decode steps (a truncate: what the user heard).
    """
    i = next((k for k, r in enumerate(slot.records) if r.turn_id == turn_id), None)
    if i is None:
        return None
    rec = slot.records[i]
    if part == "answer" and keep_steps >= len(rec.fed):
        return None  # all of it stays
    changed = rec.start if part in ("all", "prompt") else rec.start + rec.prompt_len + keep_steps
    if part in ("all", "prompt"):
        rec.prompt = None
    if part in ("all", "answer"):
        rec.fed = rec.fed[:keep_steps] if part == "answer" else []
    if rec.length == 0:
        del slot.records[i]
    replay, pos = [], rec.start
    for r in slot.records[i:]:
        pieces = r.embeds(embed, device)
        if r is rec and part == "answer":
            pieces = []  # its prompt and kept steps are still where they were
        elif r is rec and rec.prompt is not None:
            pieces = pieces[1:]  # its prompt is still where it was
        replay += pieces
        r.start = pos
        pos += r.length
    slot.ctx = changed
    return torch.cat(replay, dim=1) if replay else None


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
    slot.records = [r for r in slot.records if r.start >= drop]
    for r in slot.records:
        r.start -= drop
    slot.ctx = keep
    return drop


def feed_ids(audio: list[int], text: int) -> list[list[int]]:
    """Global ids fed back after a step: row 0 its 7 audio tokens, row 1 pad_a; same text."""
    row0 = [tk.to_global(a, layer) for layer, a in enumerate(audio)] + [text]
    row1 = [tk.to_global(tk.PAD_A, layer) for layer in range(tk.N_AUDIO_LAYERS)] + [text]
    return [row0, row1]


IDLE_IDS = feed_ids([tk.PAD_A] * tk.N_AUDIO_LAYERS, tk.PAD_T)
