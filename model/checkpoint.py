"""The released checkpoint directory: finding it, loading the LM strictly, writing one.

Layout (spec section 1): lit_model.pth, model_config.yaml, small.pt, ViT-B-32.pt,
tokenizer.json (+ tokenizer_config.json). Loading is strict: a missing, extra or mis-shaped
tensor, or a missing/corrupt file, is a `CheckpointError` naming the file and key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import yaml

from .config import ConfigError, ModelConfig
from .errors import CheckpointError, check_state_dict
from .lm import OmniLM

HUB_REPO = "gpt-omni/mini-omni2"
LM_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
WHISPER_FILE = "small.pt"
CLIP_FILE = "ViT-B-32.pt"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED_FILES = (LM_FILE, CONFIG_FILE, WHISPER_FILE, CLIP_FILE, TOKENIZER_FILE)
OPTIONAL_FILES = ("tokenizer_config.json",)


def missing_files(directory: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (directory / f).is_file()]


def resolve_checkpoint(source: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local directory in the released layout, or a hub repo id (downloaded into the HF
    cache, or found there when HF_HUB_OFFLINE=1). Raises CheckpointError saying what is wrong."""
    path = Path(source).expanduser()
    if path.is_dir():
        missing = missing_files(path)
        if missing:
            raise CheckpointError(f"{path}: not a Mini-Omni2 checkpoint, missing {', '.join(missing)}")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such checkpoint directory (and not a hub repo id like {HUB_REPO})")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text,
            allow_patterns=list(REQUIRED_FILES + OPTIONAL_FILES),
            local_files_only=not allow_download or _offline(),
        )
    except Exception as exc:  # network, auth, offline cache miss: all mean "not available here"
        raise CheckpointError(f"{source}: cannot get the checkpoint from the Hugging Face hub ({type(exc).__name__}: {exc})") from exc
    return resolve_checkpoint(local, allow_download=False)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: model config not found")
    try:
        return ModelConfig.from_yaml(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def load_lm(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> OmniLM:
    """The LM and both adapters from lit_model.pth, strictly, on `device` in `dtype`."""
    directory = Path(directory)
    cfg = read_config(directory)
    path = directory / LM_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: language-model weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, pickle garbage, wrong format
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).strip()[:300]})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    with torch.device("meta"):  # no 2 GB of throw-away random init
        lm = OmniLM(cfg)
    check_state_dict(path, state, lm.state_dict(), what="language model")
    lm.load_state_dict(state, strict=True, assign=True)
    lm.init_buffers()
    return lm.to(device=device, dtype=dtype).eval()


def save_lm(lm: OmniLM, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lm.state_dict().items()}
    torch.save(state, directory / LM_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(lm.cfg.to_yaml_dict(), sort_keys=True))


def checkpoint_name(directory: Path, cfg: Optional[ModelConfig] = None) -> str:
    cfg = cfg or read_config(directory)
    return cfg.name
