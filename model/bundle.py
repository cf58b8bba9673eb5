"""Everything one Mini-Omni2 checkpoint is made of, loaded together, and the question encoder.

`OmniModel` groups the LM (+ adapters), the Whisper encoder, the CLIP image tower, the text
tokenizer and the SNAC codec. `encode_question` turns 16 kHz speech (and an optional image)
into the two-row prompt and its input embeddings, exactly as the release builds them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from . import checkpoint as ck
from .audio_encoder import AudioEncoder, whisper_frames
from .lm import OmniLM
from .prompt import (Prompt, assistant_text, audio_question, context_text, image_audio_question,
                     text_question)
from .snac_codec import SNAC_REPO, load_snac
from .tokenizer import TextTokenizer
from .vision import VisionEncoder, decode_image

ImageInput = Union[Image.Image, bytes, None]


@dataclass
class Question:
    """A checked question waiting for its encoders: its prompt layout and raw inputs."""

    prompt: Prompt
    audio_16k: Optional[np.ndarray] = None   # 16 kHz mono speech (None: a typed question)
    image: Optional[Image.Image] = None


@dataclass
class OmniModel:
    lm: OmniLM
    audio_encoder: AudioEncoder
    vision_encoder: VisionEncoder
    tokenizer: TextTokenizer
    snac: Optional[torch.nn.Module]
    name: str
    directory: Path
    is_fallback: bool = False  # served instead of the real checkpoint (see streaming/engine/runtime.py)

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    @torch.inference_mode()
    def encode_question(self, audio_16k: Optional[np.ndarray] = None, image: ImageInput = None,
                        text: Optional[str] = None) -> tuple[Prompt, torch.Tensor]:
        """(prompt, embeds [2, T, C]) for a spoken question (optionally with an image) or a
        typed one. Encoders run in fp32 like the release; adapters in the LM's dtype."""
        q = self.question(audio_16k, image, text)
        return q.prompt, self.embed_questions([q])[0]

    def question(self, audio_16k: Optional[np.ndarray] = None, image: ImageInput = None,
                 text: Optional[str] = None) -> "Question":
        """Check one question and lay out its prompt (no encoder runs): ValueError if it is
        malformed, so one bad question never fails the others of a batch."""
        if audio_16k is None:
            if image is not None or text is None:
                raise ValueError("a question needs speech (optionally with an image) or text")
            # "" is the minimal question (input_t eot answer_t): answer from the context alone
            return Question(text_question(self.tokenizer.encode(text) if text else []))
        audio_16k = np.asarray(audio_16k, dtype=np.float32)
        if audio_16k.ndim != 1 or audio_16k.size == 0:
            raise ValueError("speech must be a non-empty mono 16 kHz array")
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(image))
        if image is not None and min(image.size) < 1:
            raise ValueError(f"cannot encode an empty image of size {image.size[0]}x{image.size[1]}")
        n = whisper_frames(audio_16k.shape[0])
        prompt = image_audio_question(n) if image is not None else audio_question(n)
        return Question(prompt, audio_16k, image)

    @torch.inference_mode()
    def embed_questions(self, questions: list["Question"]) -> list[torch.Tensor]:
        """Input embeddings [2, T, C] of each question, the encoders run once for all of them:
        one Whisper batch for the spoken ones, one CLIP batch for the images."""
        lm = self.lm
        spoken = [q for q in questions if q.audio_16k is not None]
        seen = [q for q in spoken if q.image is not None]
        speech = dict(zip(map(id, spoken), self.audio_encoder.encode_batch([q.audio_16k for q in spoken]) if spoken else []))
        pixels = dict(zip(map(id, seen), self.vision_encoder.encode_batch([q.image for q in seen]) if seen else []))
        out = []
        for q in questions:
            ids = q.prompt.ids.to(self.device)
            if q.audio_16k is None:
                out.append(lm.embed(ids))
                continue
            feats = [(lm.whisper_adapter(speech[id(q)].to(self.device, self.dtype))[None].expand(2, -1, -1),
                      q.prompt.audio_start)]
            if q.image is not None:
                feats.insert(0, (lm.vision_adapter(pixels[id(q)].to(self.device, self.dtype))[None].expand(2, -1, -1),
                                 q.prompt.image_start))
            out.append(lm.embed(ids, tuple(feats)))
        return out

    @torch.inference_mode()
    def encode_text(self, role: str, text: str) -> tuple[Prompt, torch.Tensor]:
        """(prompt, embeds) of text that joins the context without being answered: what the
        assistant said (`role` "assistant") or a system message ("system")."""
        layouts = {"assistant": assistant_text, "system": context_text}
        if role not in layouts:
            raise ValueError(f"no text layout for role {role!r}")
        prompt = layouts[role](self.tokenizer.encode(text) if text else [])
        return prompt, self.lm.embed(prompt.ids.to(self.device))


def load_model(source: str | os.PathLike, snac: Optional[str] = SNAC_REPO, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> OmniModel:
    """Load a checkpoint (local dir or hub id) and the SNAC codec (`snac=None`: skip it; by
    default a `snac/` folder inside the checkpoint wins over the hub repo)."""
    directory = ck.resolve_checkpoint(source)
    lm = ck.load_lm(directory, device=device, dtype=dtype)
    audio = AudioEncoder.from_whisper_checkpoint(directory / ck.WHISPER_FILE).to(device)
    vision = VisionEncoder.from_clip_torchscript(directory / ck.CLIP_FILE).to(device)
    tokenizer = TextTokenizer.from_dir(directory)
    codec = None
    if snac is not None:
        local = directory / "snac"
        codec = load_snac(str(local) if snac == SNAC_REPO and local.is_dir() else snac, device=device)
    return OmniModel(lm=lm, audio_encoder=audio, vision_encoder=vision, tokenizer=tokenizer, snac=codec,
                     name=lm.cfg.name, directory=directory)
