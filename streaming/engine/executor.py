"""The model executor: every part of a step that touches the model, its KV cache or the device.

The engine (engine.py) decides what runs when: admission, cancels, which prompt gets the next
prefill chunk, which slots take the decode step, when an answer ends. It hands this object
the work and gets back host lists of ids, so the scheduling can be tested with a stand-in
(tests/test_scheduler.py: a fake executor, no model).
"""
from __future__ import annotations

from typing import Optional

import torch

from omni2.model import tokens as tk
from omni2.model.bundle import OmniModel
from omni2.model.lm import KVCache
from omni2.model.sampling import sample

from .config import EngineConfig
from .host import HostPolicy
from .messages import SamplingParams, TurnRequest
from .slots import Slot, forget, make_room


class ModelExecutor:
    def __init__(self, model: OmniModel, config: EngineConfig, host: HostPolicy) -> None:
        self.model = model
        self.host = host
        lm = model.lm
        self.device = model.device
        # One position past the context limit is scratch: rows with nothing to say write there
        # when a slot's context is exactly full, so no real position is ever scribbled on.
        self.context_len = min(config.max_context or lm.cfg.block_size, lm.cfg.block_size)
        self.cache = host.allocate_cache(lambda zeros: KVCache.allocate(
            lm.cfg, rows=2 * config.max_sessions, max_len=self.context_len + 1, device=self.device, dtype=model.dtype,
            zeros=zeros))
        self.snac = model.snac
        self.interrupt_ids = lm.cfg.interrupt_token_ids
        self._gen = torch.Generator(device=self.device).manual_seed(config.seed)
        # sampling parameters per slot, on the device, updated when a turn is admitted
        n = config.max_sessions
        self._temperature = torch.zeros(n, device=self.device)
        self._top_k = torch.ones(n, dtype=torch.long, device=self.device)
        self._top_p = torch.ones(n, device=self.device)
        self._greedy = [True] * n
        self.forward = self.eager_forward
        if config.compile:
            self.forward = torch.compile(self.eager_forward, mode=config.compile, dynamic=False)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, requests: list[TurnRequest]) -> list:
        """Each turn's prompt embeddings [2, T, C], or the ValueError that refuses it (prep
        thread). The questions' encoders run once for all of them (model.embed_questions)."""
        out: list = [None] * len(requests)
        questions, at = [], []
        for i, req in enumerate(requests):
            try:
                if req.role != "user":
                    out[i] = self.model.encode_text(req.role, req.text)[1]  # ids only: no encoder runs
                else:
                    questions.append(self.model.question(req.audio_16k, image=req.image, text=req.text))
                    at.append(i)
            except ValueError as exc:
                out[i] = exc
        if questions:
            for i, embeds in zip(at, self.host.encode(self.model.embed_questions, questions)):
                out[i] = embeds
        return out

    def set_sampling(self, index: int, sp: SamplingParams) -> None:
        self._greedy[index] = sp.greedy
        self._temperature[index] = sp.temperature
        self._top_k[index] = sp.top_k
        self._top_p[index] = sp.top_p

    def make_room(self, slot: Slot, need: int) -> int:
        lm = self.model.lm
        return make_room(self.cache, slot, need, self.context_len, lm.rope_cos, lm.rope_sin)

    def forget(self, slot: Slot, turn_id: int, part: str, keep_steps: int) -> Optional[torch.Tensor]:
        return forget(slot, turn_id, part, self.model.lm.embed, self.device, keep_steps)

    def prefill(self, chunks: list[tuple[Slot, int, int]]) -> list[torch.Tensor]:
        """Prompt positions [a, b) of each slot into the cache, in one forward call; the
        hidden state [2, 1, C] of each chunk's last position.

        Chunks shorter than the longest are padded at their end: the padding writes the
        positions right after the chunk (the context limit's scratch position past it), which
        no query reads before they are written for real, and its outputs are dropped."""
        lm = self.model.lm
        if len(chunks) == 1:
            slot, a, b = chunks[0]
            rows = torch.tensor(slot.rows, device=self.device)
            pos = torch.arange(slot.start + a, slot.start + b, device=self.device)[None].expand(2, -1)
            return [lm(slot.embeds[:, a:b], self.cache, rows, pos, span=slot.start + b)[:, -1:]]
        T = max(b - a for _, a, b in chunks)
        x = torch.cat([torch.nn.functional.pad(s.embeds[:, a:b], (0, 0, 0, T - (b - a))) for s, a, b in chunks])
        rows = torch.tensor([r for s, _, _ in chunks for r in s.rows], device=self.device)
        pos = torch.cat([torch.arange(s.start + a, s.start + a + T, device=self.device)[None].expand(2, -1)
                         for s, a, _ in chunks]).clamp_(max=self.context_len)
        hidden = lm(x, self.cache, rows, pos, span=max(s.start + b for s, _, b in chunks))
        return [hidden[2 * j: 2 * j + 2, b - a - 1: b - a] for j, (_, a, b) in enumerate(chunks)]

    def decode(self, ids: list, pos: list, span: int) -> torch.Tensor:
        """One decode step for cache rows 0..len(ids)-1 ([2][8] ids and a position per row)."""
        ids_t = torch.tensor(ids, device=self.device)[:, :, None]  # [2hi, 8, 1]
        pos_t = torch.tensor(pos, device=self.device)[:, None]
        rows = len(ids)
        return self.forward(ids_t, pos_t, self.cache.k[:, :rows], self.cache.v[:, :rows], span)

    def eager_forward(self, ids, pos, k, v, span: int) -> torch.Tensor:
        """One decode step for cache rows 0..len(ids)-1, in order (k/v are views of them)."""
        lm = self.model.lm
        return lm(lm.embed(ids), KVCache(k, v), None, pos, span)

    def sample(self, hidden: torch.Tensor, slots: list[Slot]) -> tuple[list, list]:
        """hidden [2n, 1, C] for slots' row pairs -> (audio [n][7], text [n]) as host lists.

        The text head (152,000 rows, the largest matmul of a step) runs only for slots whose
        text has not ended: after `eot` every text token is replaced by pad_t anyway."""
        lm = self.model.lm
        speak, write = hidden[0::2, 0], hidden[1::2, 0]
        idx = [s.index for s in slots]
        writing = [j for j, s in enumerate(slots) if not s.rules.text_ended]
        if len(writing) < len(slots):
            write = write[torch.tensor(writing, device=self.device)] if writing else write[:0]
        if all(self._greedy[i] for i in idx):  # (the CPU fast path screens these: same ids)
            audio, text = lm.audio_argmax(speak), lm.text_argmax(write)
        else:
            sel = torch.tensor(idx, device=self.device)
            t, k, p = self._temperature[sel], self._top_k[sel], self._top_p[sel]
            audio = sample(lm.audio_logits(speak), t, k, p, self._gen)  # [n, 7]
            wsel = sel[torch.tensor(writing, dtype=torch.long, device=self.device)]
            text = sample(lm.text_logits(write), self._temperature[wsel], self._top_k[wsel], self._top_p[wsel],
                          self._gen)
        text_ids = [tk.PAD_T] * len(slots)
        for j, t in zip(writing, text.tolist()):  # the one device->host copy of the step (+ audio)
            text_ids[j] = t
        return audio.tolist(), text_ids
