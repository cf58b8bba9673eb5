"""`omni2 make-tiny DIR`: write the synthetic tiny checkpoint in the released file layout."""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write lit_model.pth, model_config.yaml, small.pt, ...")
    p.add_argument("--seed", type=int, default=0, help="weights are a pure function of the seed")


def main(args: argparse.Namespace) -> int:
    from omni2.model.tiny import write_tiny_checkpoint

    t0 = time.perf_counter()
    path = write_tiny_checkpoint(args.directory, seed=args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote tiny checkpoint to {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0
