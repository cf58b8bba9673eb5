"""The fused decode-step attention (streaming/cpu/decode_attention.c): the model's cache writes bit
for bit, the model's attention to fp32 rounding, rows independent of the batch, and the model's
own code for everything that is not an fp32 decode step."""
from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from omni2.model.config import PRESETS
from omni2.model.lm import Attention, KVCache, StepContext, rope_tables
from omni2.streaming.cpu import decode_attention

from cpu_marks import needs  # noqa: E402

pytestmark = needs("avx512", "cc")

# the released dims (head 64: the unrolled path), the tiny model's (head 8: one partial vector),
# and a head of 40 (a full and a partial vector), with 1, 3 and 7 queries per key
CONFIGS = {
    "released": replace(PRESETS["mini-omni2"], n_layer=2, block_size=320),
    "tiny": PRESETS["tiny"],
    "head40": replace(PRESETS["tiny"], n_embd=120, n_head=3, n_query_groups=3, head_size=40),
}


@pytest.fixture(scope="module")
def kernel():
    k = decode_attention.kernel()
    assert k is not None, "an AVX-512 machine with a compiler must build the kernel (see the log)"
    return k


def setup(cfg, rows: int, seed: int = 0):
    """An Attention with random weights, a cache with random history and a step's inputs."""
    torch.manual_seed(seed)
    attn = Attention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cache = KVCache.allocate(cfg, rows=rows, max_len=cfg.block_size + 1)
    cache.k.normal_(), cache.v.normal_()
    x = torch.randn(rows, 1, cfg.n_embd)
    pos = torch.randint(0, cfg.block_size, (rows, 1))
    pos[0, 0] = 0  # a row at its first position attends to itself only
    return attn, cache, x, pos


def step(module, cfg, cache, x, pos, layer: int = 1):
    cos, sin = rope_tables(cfg)
    ctx = StepContext.build(cfg, cos, sin, None, pos, int(pos.max()) + 1, x.dtype)
    with torch.no_grad():
        return module(x, ctx, layer, cache)


def clone(cache: KVCache) -> KVCache:
    return KVCache(cache.k.clone(), cache.v.clone())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_a_decode_step_writes_the_models_cache_and_attends_as_it_does(kernel, name, rows):
    cfg = CONFIGS[name]
    attn, cache, x, pos = setup(cfg, rows, seed=rows)
    plain_cache, fused_cache = clone(cache), clone(cache)
    want = step(attn, cfg, plain_cache, x, pos)
    got = step(decode_attention.DecodeAttention(attn, kernel), cfg, fused_cache, x, pos)
    assert torch.equal(fused_cache.k, plain_cache.k) and torch.equal(fused_cache.v, plain_cache.v)
    assert not torch.equal(fused_cache.k, cache.k)  # (the step did write)
    # as close to the exact result (float64) as the model's own fp32 code is, with room
    exact = step(attn.double(), cfg, KVCache(cache.k.double(), cache.v.double()), x.double(), pos)
    model_error = (want.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 2 * model_error + 1e-6 * exact.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_rows_result_does_not_depend_on_the_batch(kernel):
    """The kernel's output for a row, bit for bit, alone or at any place among 8 others."""
    cfg = CONFIGS["released"]
    G, Q, D = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size
    torch.manual_seed(3)
    cache = KVCache.allocate(cfg, rows=9, max_len=cfg.block_size + 1)
    cache.k.normal_(), cache.v.normal_()
    qkv, pos = torch.randn(9, G * (Q + 2) * D), torch.randint(0, cfg.block_size, (9,))
    cos, sin = torch.randn(9, D), torch.randn(9, D)
    batch = kernel(qkv, pos, cos, sin, cache.k[0].clone(), cache.v[0].clone(), Q, D ** -0.5)
    for r in (0, 4, 8):
        k, v = cache.k[0, r : r + 1].clone(), cache.v[0, r : r + 1].clone()
        alone = kernel(qkv[r : r + 1], pos[r : r + 1], cos[r : r + 1], sin[r : r + 1], k, v, Q, D ** -0.5)
        assert torch.equal(alone, batch[r : r + 1])


def test_other_calls_take_the_models_code_bit_for_bit(kernel):
    """Prompt chunks (several positions), a gather of cache rows, bf16: the model's Attention."""
    cfg = CONFIGS["tiny"]
    attn, cache, _, _ = setup(cfg, 3)
    fused = decode_attention.DecodeAttention(attn, kernel)
    cos, sin = rope_tables(cfg)
    x = torch.randn(1, 5, cfg.n_embd)
    for rows in (None, torch.tensor([2])):
        pos = torch.arange(4, 9)[None]
        ctx = StepContext.build(cfg, cos, sin, rows, pos, 9, x.dtype)
        first = KVCache(cache.k[:, :1], cache.v[:, :1]) if rows is None else cache  # (rows in order: one)
        a, b = clone(first), clone(first)
        with torch.no_grad():
            assert torch.equal(fused(x, ctx, 0, a), attn(x, ctx, 0, b))
        assert torch.equal(a.k, b.k)
    attn16, cache16 = attn.to(torch.bfloat16), KVCache(cache.k.bfloat16(), cache.v.bfloat16())
    x16, pos = torch.randn(3, 1, cfg.n_embd).bfloat16(), torch.tensor([[3], [7], [1]])
    want = step(attn16, cfg, clone(cache16), x16, pos)
    assert torch.equal(step(decode_attention.DecodeAttention(attn16, kernel), cfg, clone(cache16), x16, pos), want)


def test_a_position_outside_the_cache_is_refused_and_nothing_written(kernel):
    cfg = CONFIGS["tiny"]
    attn, cache, x, _ = setup(cfg, 2)
    qkv = attn.attn(x).view(2, -1).detach()
    before = clone(cache)
    angles = torch.zeros(2, cfg.head_size)
    with pytest.raises(IndexError, match="outside the cache"):
        kernel(qkv, torch.tensor([3, cache.max_len]), angles, angles, cache.k[0], cache.v[0], cfg.q_per_kv, 1.0)
    assert torch.equal(cache.k, before.k) and torch.equal(cache.v, before.v)
    with pytest.raises(ValueError, match="shapes"):
        kernel(qkv[:, 1:].contiguous(), torch.tensor([3, 4]), angles, angles, cache.k[0], cache.v[0], cfg.q_per_kv, 1.0)


def test_the_transform_swaps_every_block_once_and_can_be_switched_off(tmp_path, monkeypatch, caplog):
    from omni2.model.tiny import random_lm

    lm = random_lm(PRESETS["tiny"], 0)
    assert decode_attention.fuse_decode_attention_(lm)
    assert all(isinstance(b.attn, decode_attention.DecodeAttention) for b in lm.transformer.h)
    assert not decode_attention.fuse_decode_attention_(lm)  # once only
    assert not decode_attention.fuse_decode_attention_(random_lm(PRESETS["tiny"], 0).bfloat16())
    for cfg, fits in ((PRESETS["tiny"], True), (replace(PRESETS["tiny"], n_embd=272, n_head=2, head_size=136), False)):
        shell = SimpleNamespace(cfg=cfg, lm_head=torch.nn.Linear(2, 2), transformer=SimpleNamespace(h=[]))
        assert decode_attention.fuse_decode_attention_(shell) == fits  # heads over 128 keep the model's code
    monkeypatch.setenv("OMNI2_CACHE", str(tmp_path))
    monkeypatch.setenv("OMNI2_DECODE_ATTENTION", "0")
    decode_attention.kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="omni2.decode_attention"):
            assert not decode_attention.fuse_decode_attention_(random_lm(PRESETS["tiny"], 0))
        assert "decode-attention kernel not used (off (OMNI2_DECODE_ATTENTION=0))" in caplog.text
    finally:
        decode_attention.kernel.cache_clear()
