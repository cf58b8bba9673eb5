"""Loading the SNAC 24 kHz codec and decoding frames with deterministic noise.

The `snac` package provides the network; this file adds what serving needs around it:

* `load_snac` reads the released layout (``config.json`` + ``pytorch_model.bin``, as in the
  Hugging Face repo ``hubertsiuzdak/snac_24khz``) from a local folder or the hub cache, and
  refuses configurations whose frame arithmetic differs from Mini-Omni2's (hop 512, strides
  [4, 2, 1], 4096 codes, 24 kHz) or that the streaming decoder cannot window (local attention).
* Noise. SNAC's decoder has a NoiseBlock after every upsampling stage that adds
  ``randn * linear(x)``: calling ``decode`` twice gives two different waveforms, and a window
  decoded for streaming would get noise unrelated to the one-shot decode. We replace each
  NoiseBlock by `PositionalNoise`, whose noise is a fixed function of the *absolute* sample
  position within the utterance (a counter-based hash + Box-Muller). Decoding is then
  deterministic, and any window of an utterance sees exactly the noise the whole utterance would,
  so streaming output can equal one-shot output. Modes:
    - "positional" (production default): keeps the noise the decoder was trained with, with the
      same N(0,1) statistics, but reproducible.
    - "zero": no noise (the decoder's mean output); handy for debugging.
    - "random": the package's original behaviour (non-deterministic; no streaming equality).
* `decode_frames` turns [B, n, 7] frames into [B, n*2048] samples, given each row's absolute
  start frame (which positions the noise).
* `prepare_for_inference` (applied by `load_snac`) folds the weight norms into plain weights
  and computes Snake in one buffer: bitwise the same audio, ~1/4 less CPU time.
* `write_tiny_snac` writes a deterministic random codec with the real frame arithmetic but tiny
  widths, for tests and the synthetic tiny deployment.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import CheckpointError
from .snac_layout import FRAME_TOKENS, SAMPLE_RATE, SAMPLES_PER_FRAME, frames_to_codes

SNAC_REPO = "hubertsiuzdak/snac_24khz"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"
NOISE_MODES = ("positional", "zero", "random")

# What Mini-Omni2's frame layout assumes of the codec (spec section 7).
REQUIRED = {"hop_length": 512, "vq_strides": [4, 2, 1], "codebook_size": 4096, "sampling_rate": SAMPLE_RATE}

# The released 24 kHz config; `real_size_config()` returns it for measurements with random weights.
SNAC_24KHZ_CONFIG = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

# Same frame arithmetic, widths small enough for CI (about 0.3 MB on disk).
TINY_SNAC_CONFIG = dict(SNAC_24KHZ_CONFIG, encoder_dim=4, decoder_dim=32, codebook_dim=4)


def real_size_config() -> dict:
    return json.loads(json.dumps(SNAC_24KHZ_CONFIG))


def _snac_class():
    try:
        from snac import SNAC
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise CheckpointError("the 'snac' package is not installed (pip install snac)") from exc
    return SNAC


def validate_config(config: dict, where: str = "SNAC config") -> None:
    """Raise CheckpointError unless `config` has Mini-Omni2's frame arithmetic."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    got = {
        "hop_length": math.prod(config.get("encoder_rates") or [0]),
        "vq_strides": list(config.get("vq_strides") or []),
        "codebook_size": config.get("codebook_size"),
        "sampling_rate": config.get("sampling_rate"),
    }
    for key, want in REQUIRED.items():
        if got[key] != want:
            raise CheckpointError(f"{where}: {key}={got[key]!r}, Mini-Omni2 needs {want!r} (a 24 kHz SNAC)")
    if math.prod(config.get("decoder_rates") or [0]) != REQUIRED["hop_length"]:
        raise CheckpointError(f"{where}: decoder_rates {config.get('decoder_rates')} do not multiply to 512")
    if config.get("attn_window_size") is not None:
        # Windowed attention needs inputs padded to its window and couples whole windows:
        # frame-group streaming with bounded left context would no longer be exact.
        raise CheckpointError(f"{where}: attn_window_size must be null for streaming decode (24 kHz SNAC has none)")


def build_snac(config: dict, noise: str = "positional") -> nn.Module:
    validate_config(config)
    try:
        model = _snac_class()(**config)
    except TypeError as exc:
        raise CheckpointError(f"SNAC config has keys the snac package does not accept: {exc}") from exc
    set_noise_mode(model, noise)
    return model.eval()


def _resolve_files(source: str) -> tuple[Path, Path]:
    local = Path(source).expanduser()
    if local.is_dir():
        return local / CONFIG_FILE, local / WEIGHTS_FILE
    # Anything but a bare "owner/name" is meant as a folder: say it is missing, do not go online.
    if local.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        raise CheckpointError(f"{source}: no such SNAC directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        from huggingface_hub import hf_hub_download

        # hf_hub_download honours HF_HOME / the cache and HF_HUB_OFFLINE by itself.
        return Path(hf_hub_download(source, CONFIG_FILE)), Path(hf_hub_download(source, WEIGHTS_FILE))
    except Exception as exc:  # network, auth, offline-and-not-cached, bad repo id ...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if offline else ""
        raise CheckpointError(
            f"cannot fetch SNAC codec {source!r} from the Hugging Face hub{hint}: {type(exc).__name__}: {exc}. "
            f"Download it once, or pass a local folder with {CONFIG_FILE} + {WEIGHTS_FILE}."
        ) from exc


def load_snac(source: str = SNAC_REPO, noise: str = "positional", device: str | torch.device = "cpu") -> nn.Module:
    """Load a SNAC 24 kHz codec from a local folder or a hub repo id, in eval mode, noise patched."""
    config_path, weights_path = _resolve_files(str(source))
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a SNAC folder holds {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot parse SNAC config: {exc}") from exc
    validate_config(config, str(config_path))
    model = build_snac(config, noise="random")  # patch noise after loading: keys stay the package's
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{weights_path}: cannot read SNAC weights: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"{weights_path}: SNAC weights do not fit {config_path}: {' '.join(first)}") from exc
    set_noise_mode(model, noise)
    return prepare_for_inference(model).to(device).eval()


def write_tiny_snac(directory: str | Path, seed: int = 0) -> Path:
    """Write a deterministic random 24 kHz SNAC with tiny widths as config.json + pytorch_model.bin."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_snac(dict(TINY_SNAC_CONFIG), noise="random")
        # Default init leaves Snake alphas at 1 and biases tiny; give every tensor some spread
        # so tests exercise all paths (identical outputs for different codes would hide bugs).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("alpha"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.05)
    (directory / CONFIG_FILE).write_text(json.dumps(TINY_SNAC_CONFIG, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE)
    return directory


# ---- noise ---------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (products stay below 2**60: no overflow)."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


class PositionalNoise(nn.Module):
    """Drop-in for snac's NoiseBlock: ``x + noise(position) * linear(x)``.

    ``noise`` is N(0,1) per absolute time position of this block's rate, identical across
    channels (as in NoiseBlock), a pure function of (block seed, position). Before a decode,
    `decode_frames` sets ``frame_start`` (absolute start frame per batch row) and ``n_frames``.
    """

    def __init__(self, linear: nn.Module, seed: int, mode: str = "positional"):
        super().__init__()
        self.linear = linear  # same attribute name as NoiseBlock: state-dict keys unchanged
        self.seed = seed
        self.mode = mode
        self.frame_start: Optional[torch.Tensor] = None
        self.n_frames = 0
        # The noise of positions [0, len) computed once (it is the same for every utterance):
        # a decode reads its rows with one gather instead of ~25 element-wise ops, which on a
        # CPU are as many GIL hand-offs with the server's other threads.
        self._table: Optional[torch.Tensor] = None

    def positional(self, pos: torch.Tensor) -> torch.Tensor:
        """N(0,1) noise of absolute positions `pos` (int64), in float64."""
        key = _hash32(pos) ^ self.seed
        u1 = (_hash32(key ^ 0x68E31DA4).double() + 0.5) / 2**32
        u2 = (_hash32(key ^ 0xB5297A4D).double() + 0.5) / 2**32
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    def _table_through(self, end: int, device) -> torch.Tensor:
        table = self._table
        if table is None or table.device != torch.device(device) or table.numel() < end:
            have = 0 if table is None or table.device != torch.device(device) else table.numel()
            size = max(end, 2 * have, 1 << 16)
            grown = self.positional(torch.arange(have, size, device=device))
            table = grown if have == 0 else torch.cat([table, grown])
            self._table = table
        return table

    def noise(self, batch: int, length: int, device, dtype) -> torch.Tensor:
        if self.mode == "random":
            return torch.randn((batch, 1, length), device=device, dtype=dtype)
        if self.frame_start is None or self.n_frames <= 0 or length % self.n_frames:
            raise RuntimeError("PositionalNoise needs frame positions: decode through snac_codec.decode_frames")
        per_frame = length // self.n_frames
        frame_start = self.frame_start.to(dtype=torch.long)
        if frame_start.numel() and int(frame_start.min()) >= 0:
            table = self._table_through((int(frame_start.max()) + self.n_frames) * per_frame, device)
            if batch == 1:
                begin = int(frame_start[0]) * per_frame
                normal = table[begin : begin + length].view(1, -1)
            else:
                starts = [int(s) * per_frame for s in frame_start.tolist()]
                normal = torch.stack([table[s : s + length] for s in starts])
        else:
            start = frame_start.to(device=device).view(-1, 1) * per_frame
            normal = self.positional(start + torch.arange(length, device=device).view(1, -1))  # [B, T]
        return normal.to(dtype).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "zero":
            return x
        return x + self.noise(x.shape[0], x.shape[-1], x.device, x.dtype) * self.linear(x)


def set_noise_mode(model: nn.Module, mode: str) -> nn.Module:
    """Replace every NoiseBlock of `model.decoder` by a PositionalNoise in `mode` (idempotent)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode {mode!r} is not one of {NOISE_MODES}")
    index = 0
    for parent in model.decoder.modules():
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "NoiseBlock" or isinstance(child, PositionalNoise):
                if isinstance(child, PositionalNoise):
                    child.mode = mode
                else:
                    setattr(parent, name, PositionalNoise(child.linear, seed=_hash32(torch.tensor(index + 1)).item(), mode=mode))
                index += 1
    model.noise_mode = mode
    return model


class InferenceSnake(nn.Module):
    """snac's Snake1d, ``x + 1/(alpha + 1e-9) * sin(alpha x)^2``, in one buffer.

    The package's scripted version allocates a fresh tensor for each of its five operations;
    on a CPU those allocations (their page faults) cost about as much as the arithmetic. Same
    operations in the same order, so the same bits. Inference only (in-place on a temporary)."""

    def __init__(self, alpha: nn.Parameter) -> None:
        super().__init__()
        self.alpha = alpha  # same name as in Snake1d
        self.register_buffer("inv_alpha", (alpha.detach() + 1e-9).reciprocal(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1)
        y = torch.mul(self.alpha, x)
        y.sin_().pow_(2).mul_(self.inv_alpha)
        return y.add_(x).reshape(shape)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """In place: weight-normed convolutions get their computed weight as a plain parameter
    (instead of recomputing it on every call) and Snake1d becomes InferenceSnake. The audio is
    bitwise unchanged (tested); measured on the real-size decoder, one CPU thread, a 10-frame
    window: 251 -> 201 ms, 8 windows in one batch: 2820 -> 2115 ms. Load weights before this:
    the state dict's weight-norm keys are gone afterwards."""
    from torch.nn.utils import parametrize

    with torch.no_grad():
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            for name, child in list(module.named_children()):
                if type(child).__name__ == "Snake1d":
                    setattr(module, name, InferenceSnake(child.alpha))
    return model


def noise_blocks(model: nn.Module) -> list[PositionalNoise]:
    return [m for m in model.decoder.modules() if isinstance(m, PositionalNoise)]


@torch.inference_mode()
def decode_frames(model: nn.Module, frames: torch.Tensor, start_frames: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Frames [B,n,7] (or [n,7]) of valid codes -> float samples [B, n*2048] on the model's device.

    `start_frames[b]` is the absolute index of row b's first frame in its utterance; it only
    positions the noise (default 0). SNAC.decode pads nothing (only `encode` pads its input),
    so n frames give exactly n*2048 samples. The positions are set on the model's noise blocks
    for the duration of the call: one model must not decode from two threads at once.
    """
    if frames.dim() == 2:
        frames = frames.unsqueeze(0)
    b, n, k = frames.shape
    if k != FRAME_TOKENS or n == 0:
        raise ValueError(f"need [B,n>0,{FRAME_TOKENS}] frames, got {tuple(frames.shape)}")
    device = next(model.parameters()).device
    starts = torch.zeros(b, dtype=torch.long) if start_frames is None else torch.as_tensor(start_frames, dtype=torch.long)
    if starts.shape != (b,):
        raise ValueError(f"start_frames must have one entry per row ({b}), got {tuple(starts.shape)}")
    for block in noise_blocks(model):
        block.frame_start, block.n_frames = starts, n  # on the CPU: the noise table is sliced by them
    codes = [c.to(device) for c in frames_to_codes(frames.long())]
    audio = model.decode(codes)  # [B, 1, n*2048]
    if audio.shape[-1] != n * SAMPLES_PER_FRAME:
        raise RuntimeError(f"SNAC returned {audio.shape[-1]} samples for {n} frames, expected {n * SAMPLES_PER_FRAME}")
    return audio[:, 0, :]
