"""Token sampling, vectorised over rows so one call serves every live session.

Greedy rows (temperature 0 or top_k 1) take the argmax, which is what the release's
top_k=1 sampling amounts to. Other rows apply temperature, then top-k, then top-p.
"""
from __future__ import annotations

from typing import Optional

import torch


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [B, ..., V]; per-row parameters [B]. Returns ids [B, ...]."""
    greedy_ids = logits.argmax(dim=-1)
    greedy = (temperature <= 0) | (top_k == 1)
    if bool(greedy.all()):  # the common case; a host read of B flags, not of logits
        return greedy_ids
    shape = (-1,) + (1,) * (logits.dim() - 1)  # per-row parameter against [B, ..., V]
    id_shape = (-1,) + (1,) * (logits.dim() - 2)  # per-row flag against ids [B, ...]
    x = logits.float() / temperature.clamp_min(1e-5).view(shape)
    V = x.size(-1)
    # top-k: keep values >= the k-th largest (k <= 0 means no limit)
    k = torch.where(top_k <= 0, torch.full_like(top_k, V), top_k.clamp(max=V))
    kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k.view(shape) - 1).expand(*x.shape[:-1], 1))
    x = x.masked_fill(x < kth, float("-inf"))
    # top-p: drop the tail whose cumulative probability, from the least likely, is <= 1 - p
    sorted_x, order = torch.sort(x, dim=-1)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p).view(shape)
    drop[..., -1] = False
    x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = x.softmax(dim=-1).reshape(-1, V)
    sampled = torch.multinomial(probs, 1, generator=generator).view(x.shape[:-1])
    return torch.where(greedy.view(id_shape), greedy_ids, sampled)
