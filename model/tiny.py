"""The synthetic tiny checkpoint: random weights in the released on-disk layout.

Same file names, key names, token spaces and special ids as `gpt-omni/mini-omni2` (plus a
`snac/` folder in the `hubertsiuzdak/snac_24khz` layout), at widths small enough for CI and
the offline demo. Deterministic: the same seed writes byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ck
from . import tokens
from .audio_encoder import write_tiny_whisper
from .config import PRESETS, ModelConfig
from .lm import OmniLM
from .snac_codec import write_tiny_snac
from .tokenizer import TextTokenizer, write_tiny_tokenizer
from .vision import write_tiny_clip


def random_lm(cfg: ModelConfig, seed: int = 0, text_vocab_in_use: int | None = None) -> OmniLM:
    """Seeded weights scaled so that logits are far from ties (argmax is stable run to run).

    With `text_vocab_in_use`, head rows of text ids the tiny tokenizer lacks are zeroed (the
    specials from eot on are kept), so greedy text lands on ids that decode to visible text:
    transcripts in demos and tests are then non-empty."""
    gen = torch.Generator().manual_seed(seed)
    lm = OmniLM(cfg)
    with torch.no_grad():
        for name, p in sorted(lm.named_parameters()):
            if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        if text_vocab_in_use is not None:
            lm.lm_head.weight[text_vocab_in_use : tokens.EOT] = 0.0
    return lm.eval()


def write_tiny_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory)
    in_use = TextTokenizer.from_dir(directory).vocab_size
    ck.save_lm(random_lm(PRESETS["tiny"], seed, text_vocab_in_use=in_use), directory)
    write_tiny_whisper(directory / ck.WHISPER_FILE, seed=seed)
    write_tiny_clip(directory / ck.CLIP_FILE, seed=seed)
    write_tiny_snac(directory / "snac", seed=seed)
    return directory
