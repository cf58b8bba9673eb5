"""Choosing what to serve: which checkpoint, on which device, in which precision.

`--model auto` looks for the released checkpoint (a local dir in OMNI2_CHECKPOINT, the
Hugging Face cache, or a download when online) and, when it cannot get one, falls back to
the built-in tiny model with a loud warning, so a server always comes up.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from omni2.model.bundle import OmniModel, load_model
from omni2.model.checkpoint import HUB_REPO
from omni2.model.errors import CheckpointError
from omni2.model.snac_codec import SNAC_REPO

from ..paths import cache_root

log = logging.getLogger("omni2.runtime")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
    return device


class UnsupportedDtype(ValueError):
    """The precision asked for does not run natively here; the message is one line for the user."""


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """fp32 on CPU (reference-exact, and what every CPU runs), bf16 on GPU unless asked
    otherwise. bf16 on a CPU only where oneDNN runs it natively (cpu/features.py)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        picked = DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPES))}") from None
    if picked == torch.bfloat16 and device == "cpu":
        from ..cpu import features as cpu_features

        reason = cpu_features.missing("bf16")
        if reason is not None:
            raise UnsupportedDtype(f"--dtype {dtype} cannot run on this CPU ({cpu_features.cpu_model()}): {reason}; "
                                   "use --dtype fp32 (or auto)")
    return picked


def tiny_checkpoint_dir() -> Path:
    """Where the built-in tiny checkpoint is written once (it is generated, never downloaded)."""
    return cache_root() / "tiny-v1"


def ensure_tiny_checkpoint() -> Path:
    from omni2.model.checkpoint import missing_files
    from omni2.model.tiny import write_tiny_checkpoint

    def complete(p: Path) -> bool:
        return p.is_dir() and not missing_files(p) and (p / "snac" / "config.json").is_file()

    path = tiny_checkpoint_dir()
    if not complete(path):
        shutil.rmtree(path, ignore_errors=True)  # a half-written one from an interrupted run
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        write_tiny_checkpoint(tmp)
        try:
            tmp.rename(path)  # atomic; fails if a concurrent process got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    if not complete(path):
        raise CheckpointError(f"{path}: could not write the built-in tiny checkpoint")
    return path


def _warn_fallback(reason: str) -> None:
    bar = "!" * 78
    msg = (f"\n{bar}\n!! omni2: the real Mini-Omni2 checkpoint is not available: {reason}\n"
           f"!! Serving the BUILT-IN TINY MODEL instead: random weights, its speech is noise.\n"
           f"!! Point --model at a checkpoint dir (or set OMNI2_CHECKPOINT) to serve the real model.\n{bar}\n")
    print(msg, file=sys.stderr, flush=True)
    log.warning("falling back to the tiny model: %s", reason)


def load_runtime(model: str = "auto", device: str = "auto", dtype: str = "auto",
                 snac: Optional[str] = None, prepack: bool = False) -> OmniModel:
    """Load the model to serve. Returns an OmniModel with `is_fallback` set.

    prepack: on a CPU, lay the LM's weights out for oneDNN once (streaming/cpu/accelerate.py):
    faster decode steps, the same tokens; off, the model is exactly as loaded."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    fallback = False
    if model == "tiny":
        bundle = load_model(ensure_tiny_checkpoint(), snac=snac or SNAC_REPO, device=dev, dtype=dt)
    elif model == "auto":
        source = os.environ.get("OMNI2_CHECKPOINT", HUB_REPO)
        try:
            bundle = load_model(source, snac=snac or SNAC_REPO, device=dev, dtype=dt)
        except CheckpointError as exc:
            _warn_fallback(str(exc))
            fallback = True
            bundle = load_model(ensure_tiny_checkpoint(), snac=SNAC_REPO, device=dev, dtype=dt)
    else:
        bundle = load_model(model, snac=snac or SNAC_REPO, device=dev, dtype=dt)
    bundle.is_fallback = fallback
    if prepack:
        from ..cpu.accelerate import accelerate_

        accelerate_(bundle.lm)
    return bundle
