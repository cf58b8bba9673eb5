"""Reference generation: one turn, two rows, greedy, fp32 — the model-level truth.

This reproduces the released decoding loop step for step (spec section 6), including two
details of the release that the spec's prose glosses over:
- step 0's tokens come from the prefill and are kept unchecked: an `eot` or `eoa` there does
  not trigger the end rules (the release applies them from step 1 on);
- from step 1 on, a text token after `eot` is replaced by `pad_t` *before* the `eoa` test.
The engine must produce exactly these tokens; tests compare it against this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import tokens as tk
from .lm import KVCache, OmniLM
from .prompt import Prompt, step_ids


@dataclass
class Generation:
    text_tokens: list[int] = field(default_factory=list)  # sampled from row 1, per step
    audio_tokens: list[list[int]] = field(default_factory=list)  # 7 local ids from row 0, per step
    stop: str = "max_steps"  # "eoa" | "max_steps"


class EndRules:
    """Per-turn end rules, shared by this reference loop and the engine."""

    def __init__(self) -> None:
        self.text_ended = False

    def apply(self, step: int, audio: list[int], text: int) -> tuple[bool, int]:
        """Returns (stop, text token to keep and feed back) for a step's sampled tokens."""
        if step == 0:
            return False, text
        if self.text_ended:
            text = tk.PAD_T
        if audio[tk.N_AUDIO_LAYERS - 1] == tk.EOA:
            return True, text
        if text == tk.EOT:
            self.text_ended = True
        return False, text


def max_steps_for(cfg_block: int, prompt_len: int, requested: int) -> int:
    if prompt_len >= cfg_block:
        raise ValueError(f"prompt of {prompt_len} positions does not fit the {cfg_block}-position context")
    return max(1, min(requested, cfg_block - prompt_len))


@torch.inference_mode()
def generate(lm: OmniLM, prompt: Prompt, embeds: torch.Tensor, max_steps: int) -> Generation:
    """embeds [2, T, C]: the prompt's input embeddings (adapters already applied)."""
    T = prompt.length
    max_steps = max_steps_for(lm.cfg.block_size, T, max_steps)
    device = embeds.device
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=T + max_steps, device=device, dtype=embeds.dtype)
    pos = torch.arange(T, device=device)[None].expand(2, T)
    hidden = lm(embeds, cache, None, pos, span=T)[:, -1]
    out = Generation()
    rules = EndRules()
    audio = text = None  # the previous step's tokens, fed back from step 1 on
    for step in range(max_steps):
        if step > 0:
            ids = step_ids(audio[None], text[None])[0][:, :, None]  # [2, 8, 1]
            p = T + step - 1
            hidden = lm(lm.embed(ids), cache, None, torch.full((2, 1), p, device=device), span=p + 1)[:, -1]
        audio = lm.audio_logits(hidden[0]).argmax(-1)  # [7]
        text = lm.text_logits(hidden[1]).argmax(-1)  # []
        audio_list = audio.tolist()
        stop, text_id = rules.apply(step, audio_list, int(text))
        if stop:
            out.stop = "eoa"
            break
        text = torch.tensor(text_id, device=device)
        out.audio_tokens.append(audio_list)
        out.text_tokens.append(text_id)
    return out
