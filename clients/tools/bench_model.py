"""`omni2 bench model`: time per decode step of the bare model, tiny and real-size.

One turn's two rows, fp32 by default, greedy, our head split (audio head on row 0, text head
on row 1) against the full head on both rows in the same run. Weights are seeded random:
speed does not depend on their values.
"""
from __future__ import annotations

import statistics
import time

import torch

from omni2.model.config import PRESETS
from omni2.model.lm import KVCache
from omni2.model.tiny import random_lm


def _step_times(lm, split_head: bool, steps: int, prompt: int = 54) -> list[float]:
    dev = lm.lm_head.weight.device
    dt = lm.lm_head.weight.dtype
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=prompt + steps + 1, device=dev, dtype=dt)
    gen = torch.Generator().manual_seed(0)
    x = lm.embed(torch.randint(0, lm.cfg.padded_vocab_size, (2, 8, prompt), generator=gen).to(dev))
    lm(x, cache, None, torch.arange(prompt, device=dev)[None].expand(2, -1), span=prompt)
    ids = torch.randint(0, lm.cfg.padded_vocab_size, (2, 8, 1), generator=gen).to(dev)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        h = lm(lm.embed(ids), cache, None, torch.full((2, 1), prompt + s, device=dev), span=prompt + s + 1)[:, -1]
        if split_head:
            out = (lm.audio_logits(h[0]).argmax(-1), lm.text_logits(h[1]).argmax(-1))
        else:
            out = lm.logits(h).argmax(-1)
        torch.cuda.synchronize() if dev.type == "cuda" else None
        times.append(time.perf_counter() - t0)
        del out
    return times


@torch.inference_mode()
def run_model_bench(dtype: str = "fp32", device: str = "cpu", repeats: int = 5, out=print) -> dict:
    from omni2.streaming.engine.runtime import pick_dtype

    dt = pick_dtype(dtype, device)
    result = {}
    out(f"# omni2 bench model: dtype={dt} device={device} torch threads={torch.get_num_threads()}")
    out(f"{'model':>10} {'params':>8} {'split head ms/step':>19} {'full head ms/step':>18}")
    for name in ("tiny", "mini-omni2"):
        lm = random_lm(PRESETS[name]).to(device=device, dtype=dt).eval()
        params = sum(p.numel() for p in lm.parameters())
        steps = 8 if name == "mini-omni2" else 32
        _step_times(lm, True, 2)  # warm-up
        split = statistics.median(t for _ in range(repeats) for t in _step_times(lm, True, steps))
        full = statistics.median(t for _ in range(repeats) for t in _step_times(lm, False, steps))
        result[name] = {"params": params, "split_ms": 1000 * split, "full_ms": 1000 * full}
        out(f"{name:>10} {params / 1e6:>7.1f}M {1000 * split:>19.2f} {1000 * full:>18.2f}")
        del lm
    return result
