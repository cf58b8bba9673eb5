"""Speech input of Mini-Omni2: Whisper log-mel front end and the Whisper-small encoder.

Mini-Omni2 feeds 16 kHz mono speech through Whisper's own preprocessing (pad/trim to 30 s,
80-bin log-mel, 3000 frames) and the encoder half of the released `small.pt`, then keeps
the first `L = int(duration_ms / 20) + 1` of the 1500 encoder frames. The preprocessing
here calls openai-whisper's functions so the mel is the reference's bit for bit, and the
encoder reuses `whisper.model.AudioEncoder` so its arithmetic is the reference's too; what
this module adds is a strict, fp32, encoder-only loader with clear errors, and a writer of
tiny synthetic checkpoints in the released layout for tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import whisper
import whisper.model as whisper_model
from torch import nn

from .errors import CheckpointError, check_state_dict


@dataclass(frozen=True)
class AudioFrontend:
    """Limits of the speech front end (those of Whisper and of Mini-Omni2's `load_audio`)."""

    sample_rate: int = 16_000
    # One encoder frame covers 20 ms (10 ms mel hop, stride-2 conv).
    frame_ms: int = 20
    # 30 s of audio: Whisper pads/trims to this, so no more frames than this exist.
    max_frames: int = 1500


AUDIO_FRONTEND = AudioFrontend()

# Dims of the encoder half of a whisper checkpoint's `dims` dict.
_ENCODER_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")


def whisper_frames(n_samples_16k: int, frontend: AudioFrontend = AUDIO_FRONTEND) -> int:
    """Number of encoder frames Mini-Omni2 keeps for `n_samples_16k` samples of speech.

    Computed exactly as the reference `load_audio` does (float milliseconds, truncation,
    plus one), capped at the 1500 frames that 30 s of mel produce.
    """
    if n_samples_16k < 0:
        raise ValueError(f"negative sample count {n_samples_16k}")
    duration_ms = (n_samples_16k / frontend.sample_rate) * 1000
    return min(int(duration_ms / frontend.frame_ms) + 1, frontend.max_frames)


def log_mel(samples_16k: np.ndarray | torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper log-mel of 16 kHz mono samples: `[n_mels, 3000]` float32 (30 s, padded/trimmed)."""
    if isinstance(samples_16k, torch.Tensor):
        samples = samples_16k.detach().to("cpu", torch.float32)
    else:
        # The reference reads audio through whisper.load_audio, which yields float32.
        samples = np.asarray(samples_16k, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected 1-D mono samples, got shape {tuple(samples.shape)}")
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(samples), n_mels=n_mels)


class AudioEncoder(nn.Module):
    """Whisper encoder: `mel [B, n_mels, 2 * n_audio_ctx] -> [B, n_audio_ctx, n_audio_state]`."""

    def __init__(self, n_mels: int, n_audio_ctx: int, n_audio_state: int, n_audio_head: int, n_audio_layer: int):
        super().__init__()
        if n_audio_state % n_audio_head:
            raise ValueError(f"n_audio_state {n_audio_state} is not a multiple of n_audio_head {n_audio_head}")
        self.dims = dict(
            n_mels=n_mels,
            n_audio_ctx=n_audio_ctx,
            n_audio_state=n_audio_state,
            n_audio_head=n_audio_head,
            n_audio_layer=n_audio_layer,
        )
        # Named `encoder` so our state-dict keys are the checkpoint's `encoder.*` keys verbatim.
        self.encoder = whisper_model.AudioEncoder(n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer)

    @property
    def out_dim(self) -> int:
        return self.dims["n_audio_state"]

    @property
    def n_mels(self) -> int:
        return self.dims["n_mels"]

    @property
    def n_frames(self) -> int:
        """Encoder frames per 30 s window (1500 for every released Whisper)."""
        return self.dims["n_audio_ctx"]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        want = (self.dims["n_mels"], 2 * self.dims["n_audio_ctx"])
        if mel.ndim != 3 or tuple(mel.shape[1:]) != want:
            raise ValueError(f"expected mel of shape [B, {want[0]}, {want[1]}], got {list(mel.shape)}")
        return self.encoder(mel)

    @torch.no_grad()
    def encode(self, samples_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features Mini-Omni2 feeds its whisper adapter: `[L, out_dim]`, L = whisper_frames(n)."""
        return self.encode_batch([samples_16k])[0]

    @torch.no_grad()
    def encode_batch(self, batch: list) -> list[torch.Tensor]:
        """`encode` of several clips in one forward call. Whisper pads every clip to the same
        30 s of mel and nothing mixes batch entries, so each result is the clip's own encoding
        (up to the float rounding of a larger matrix product)."""
        param = next(self.parameters())
        mels = torch.stack([log_mel(s, self.n_mels) for s in batch]).to(param.device, param.dtype)
        out = self.forward(mels)
        return [out[i, : whisper_frames(int(s.shape[-1]) if s.ndim else 0)] for i, s in enumerate(batch)]

    # ---- checkpoint I/O ---------------------------------------------------------------
    @classmethod
    def from_whisper_checkpoint(cls, path: str | Path) -> "AudioEncoder":
        """Load the encoder half of an OpenAI Whisper checkpoint (`small.pt`) strictly, in fp32.

        The decoder.* keys are ignored; every encoder.* key must be present with the shape
        the checkpoint's own `dims` imply, and no other encoder.* key may exist.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: whisper checkpoint not found")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch/zip/pickle raise many types for a damaged file
            raise CheckpointError(f"{path}: cannot read whisper checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
            raise CheckpointError(f"{path}: not a whisper checkpoint (expected a dict with 'dims' and 'model_state_dict')")
        dims, state = ckpt["dims"], ckpt["model_state_dict"]
        if not isinstance(dims, dict) or not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a whisper checkpoint ('dims' and 'model_state_dict' must be dicts)")
        for key in _ENCODER_DIMS:
            if not isinstance(dims.get(key), int) or dims[key] <= 0:
                raise CheckpointError(f"{path}: dims[{key!r}] is {dims.get(key)!r}, expected a positive int")
        try:
            model = cls(**{k: dims[k] for k in _ENCODER_DIMS})
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        encoder_state = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("encoder.")}
        check_state_dict(path, encoder_state, model.state_dict(), what="whisper encoder")
        with torch.no_grad():
            # load_state_dict copies into the fp32 parameters, upcasting the release's fp16.
            model.load_state_dict(encoder_state, strict=True)
        return model.eval()


def _tiny_dims() -> whisper_model.ModelDimensions:
    # n_audio_ctx stays 1500 because mel input is always 30 s (3000 frames); the vocabulary
    # and text context match Whisper's multilingual decoder so the key shapes are familiar.
    return whisper_model.ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=32,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=32,
        n_text_head=2,
        n_text_layer=1,
    )


def write_tiny_whisper(path: str | Path, seed: int = 0) -> Path:
    """Write a deterministic random Whisper checkpoint in the released `small.pt` layout.

    Full key set (encoder and decoder) of `whisper.model.Whisper`, fp16 like the release,
    at tiny widths (a few MB). The encoder's sinusoidal positional table is kept exact, as
    in the release; every other tensor is seeded noise at a scale that keeps activations O(1).
    """
    path = Path(path)
    dims = _tiny_dims()
    reference = whisper_model.Whisper(dims).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in reference.items():
        if name == "encoder.positional_embedding":
            value = tensor.clone()
        elif tensor.ndim == 1 and name.endswith(".weight"):  # every 1-D weight is a LayerNorm gain
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
        elif tensor.ndim == 1:
            value = 0.1 * torch.randn(tensor.shape, generator=gen)
        else:
            fan_in = int(np.prod(tensor.shape[1:]))
            value = torch.randn(tensor.shape, generator=gen) / fan_in**0.5
        state[name] = value.to(torch.float16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": state}, path)
    return path
