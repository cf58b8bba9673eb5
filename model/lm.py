"""The Mini-Omni2 language model: a Qwen2-0.5B body reading and writing 8 token streams.

Plain modules, readable top to bottom (spec sections 2-4). Parameter names follow the
released `lit_model.pth` so its state dict loads with `strict=True`. The model is pure: the
KV cache is an argument (a `KVCache` the caller allocates once), nothing here keeps state
between calls, and there is no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import tokens
from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype (as the release does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


class SwiGLU(nn.Module):
    """proj(silu(fc_1 x) * fc_2 x): the block MLP and both modality adapters."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(dim_in, hidden, bias=False)
        self.fc_2 = nn.Linear(dim_in, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [block_size, head_size] in the rotate-half layout (angles repeated twice)."""
    n = cfg.head_size
    theta = 1.0 / (cfg.rope_base ** (torch.arange(0, n, 2, device=device).float() / n))
    angles = torch.outer(torch.arange(cfg.block_size, device=device).float(), theta).repeat(1, 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return ((x * cos) + (rotated * sin)).to(x.dtype)


@dataclass
class KVCache:
    """Static cache for all rows an engine may run: k/v [n_layer, rows, groups, max_len, head]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, rows: int, max_len: Optional[int] = None, device=None, dtype=None,
                 zeros=torch.zeros) -> "KVCache":
        """zeros(shape, device=, dtype=): the allocator of the two zero-filled tensors."""
        shape = (cfg.n_layer, rows, cfg.n_query_groups, max_len or cfg.block_size, cfg.head_size)
        return cls(zeros(shape, device=device, dtype=dtype), zeros(shape, device=device, dtype=dtype))

    @property
    def rows(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)


@dataclass
class StepContext:
    """What every layer of one forward call shares, built once per call (not per layer)."""

    pos: torch.Tensor  # [B,T] absolute positions
    rows: Optional[torch.Tensor]  # [B] cache rows, or None for rows 0..B-1 in order
    write_rows: torch.Tensor  # [B,T] the cache row of each position
    span: int  # cache positions [0, span) are attended
    cos: torch.Tensor  # [B,1,1,T,D]
    sin: torch.Tensor
    mask: torch.Tensor  # [B,1,Q*T,span] additive: 0 where a query may attend, -inf elsewhere

    @classmethod
    def build(cls, cfg: ModelConfig, rope_cos, rope_sin, rows, pos: torch.Tensor, span: int,
              dtype: torch.dtype) -> "StepContext":
        B, T = pos.shape
        write_rows = (torch.arange(B, device=pos.device) if rows is None else rows)[:, None].expand(B, T)
        future = torch.arange(span, device=pos.device)[None, None, :] > pos[:, :, None]  # B,T,span
        # additive, as SDPA would make of a boolean mask in every layer
        mask = torch.zeros(future.shape, dtype=dtype, device=pos.device).masked_fill_(future, float("-inf"))
        mask = mask.repeat(1, cfg.q_per_kv, 1)[:, None]  # query index = head*T + t
        return cls(pos=pos, rows=rows, write_rows=write_rows, span=span,
                   cos=rope_cos[pos][:, None, None], sin=rope_sin[pos][:, None, None], mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Fused QKV grouped by KV group: per group, q_per_kv query heads, 1 key, 1 value.
        self.attn = nn.Linear(cfg.n_embd, cfg.qkv_rows, bias=True)
        self.proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, ctx: "StepContext", layer: int, cache: KVCache) -> torch.Tensor:
        """x [B,T,C] at absolute positions ctx.pos [B,T] of cache rows ctx.rows [B].

        Attends to cache positions [0, span) of each row, masked to <= its own position, so
        one call serves a prefill chunk (T>1, one turn) or a decode step (T=1, every row).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        G, Q, D = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size
        qkv = self.attn(x).view(B, T, G, Q + 2, D).permute(0, 2, 3, 1, 4)  # B,G,Q+2,T,D
        qk = apply_rope(qkv[:, :, : Q + 1], ctx.cos, ctx.sin)  # queries and key rotate alike
        q, k, v = qk[:, :, :Q], qk[:, :, Q:], qkv[:, :, Q + 1 :]
        # Write this chunk's keys/values: advanced indices (rows, pos) select [B,T] slots.
        cache.k[layer, ctx.write_rows, :, ctx.pos] = k[:, :, 0].permute(0, 2, 1, 3).to(cache.k.dtype)
        cache.v[layer, ctx.write_rows, :, ctx.pos] = v[:, :, 0].permute(0, 2, 1, 3).to(cache.v.dtype)
        if ctx.rows is None:  # every cache row in order (the decode step): a view, no gather
            keys, vals = cache.k[layer, :, :, : ctx.span], cache.v[layer, :, :, : ctx.span]
        else:
            keys, vals = cache.k[layer, ctx.rows, :, : ctx.span], cache.v[layer, ctx.rows, :, : ctx.span]
        # Query heads of one group share its key: fold them into the query length, no copy of K/V.
        q = q.reshape(B, G, Q * T, D)
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=ctx.mask, scale=D ** -0.5)
        y = y.view(B, G, Q, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, G * Q * D)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, cfg.intermediate_size, cfg.n_embd)

    def forward(self, x, ctx: "StepContext", layer: int, cache: KVCache):
        x = x + self.attn(self.norm_1(x), ctx, layer, cache)
        return x + self.mlp(self.norm_2(x))


class OmniLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=RMSNorm(cfg.n_embd, cfg.norm_eps),
            )
        )
        # Stored separately in the release although the config ties it; we keep both as loaded.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.whisper_adapter = SwiGLU(cfg.whisper_adapter_dim, cfg.intermediate_size, cfg.n_embd)
        self.vision_adapter = SwiGLU(cfg.vision_adapter_dim, cfg.intermediate_size, cfg.n_embd)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)build the rotary tables, e.g. after loading weights into a meta-device model."""
        device = self.lm_head.weight.device
        cos, sin = rope_tables(self.cfg, device=None if device.type == "meta" else device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- input side ----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, features: tuple = ()) -> torch.Tensor:
        """Mean of the 8 stream embeddings. ids [B,8,T] are global rows (audio already shifted).

        `features` holds (adapted [B,n,C], start) pairs: they replace the 7 audio streams'
        embeddings at positions start..start+n-1; the text stream's embedding is kept.
        """
        streams = [self.transformer.wte(ids[:, s]) for s in range(tokens.N_STREAMS)]
        for adapted, start in features:
            end = start + adapted.size(1)
            for s in range(tokens.N_AUDIO_LAYERS):
                streams[s] = streams[s].clone()
                streams[s][:, start:end] = adapted.to(streams[s].dtype)
        total = streams[0]
        for s in streams[1:]:  # summed in stream order, as the release does
            total = total + s
        return total / tokens.N_STREAMS

    # ---- transformer -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: KVCache, rows: Optional[torch.Tensor], pos: torch.Tensor, span: int) -> torch.Tensor:
        """Hidden states after ln_f for embeddings x [B,T,C] at positions pos [B,T].

        rows [B] picks the cache rows x belongs to; None means all cache rows, in order.
        `span` bounds the attended cache length (max position + 1 over the batch); the caller
        knows it without reading the device.
        """
        ctx = StepContext.build(self.cfg, self.rope_cos, self.rope_sin, rows, pos, span, x.dtype)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, ctx, layer, cache)
        return self.transformer.ln_f(x)

    # ---- output side -------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """All 181,120 logits; split with tokens.TEXT_SLICE / tokens.audio_slice(a)."""
        return self.lm_head(hidden)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight[tokens.TEXT_SLICE])

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., 7, 4160] local-id logits of the 7 audio layers, from one head slice."""
        w = self.lm_head.weight[tokens.PADDED_TEXT_VOCAB :]
        return F.linear(hidden, w).unflatten(-1, (tokens.N_AUDIO_LAYERS, tokens.PADDED_AUDIO_VOCAB))

    # Greedy picks. A runtime may install faster exact versions (streaming/cpu/screened_argmax.py).
    def text_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, C] -> the greedy text id of each row [R]."""
        return self.text_logits(hidden).argmax(-1)

    def audio_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, C] -> the greedy local id of each audio layer [R, 7]."""
        return self.audio_logits(hidden).argmax(-1)
