"""CPU weight prepacking (streaming/cpu/prepack.py): faster kernels, the same tokens.

The packed model is a separate load of the tiny checkpoint (prepacking is in place); the
reference is `generate` on the shared, unpacked `tiny_model`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2.model.bundle import load_model
from omni2.model.generate import generate
from omni2.model.lm import KVCache
from omni2.streaming.cpu import decode_attention, few_rows, prepack
from omni2.streaming.cpu.accelerate import accelerate_
from omni2.streaming.cpu.decode_attention import DecodeAttention
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.messages import TurnDone, TurnRequest
from omni2.streaming.cpu.screened_argmax import fast_bf16

from cpu_marks import needs  # noqa: E402

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch has no oneDNN packed linear")


def question(seed, seconds=0.6):
    return (0.1 * np.random.RandomState(seed).randn(int(16000 * seconds))).astype(np.float32)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 16, 40])
def test_bf16_packed_linear_is_bitwise_plain_linear(rows):
    torch.manual_seed(rows)
    w, b = torch.randn(300, 96).bfloat16(), torch.randn(300).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    assert torch.equal(prepack.PackedLinear(w, b, plain_rows=0)(x), F.linear(x, w, b))


def test_fp32_packed_linear_without_few_rows_is_plain_up_to_two_rows_and_close_beyond():
    torch.manual_seed(0)
    w, b = torch.randn(300, 96), torch.randn(300)
    lin = prepack.PackedLinear(w, b, plain_rows=prepack.FP32_PLAIN_ROWS)
    for rows in (1, 2):
        x = torch.randn(rows, 96)
        assert torch.equal(lin(x), F.linear(x, w, b))
    x = torch.randn(2, 8, 96)  # 16 rows through the packed kernel, any leading shape
    torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module", params=["fp32", pytest.param("bf16", marks=needs("bf16"))])
def packed_pair(request, tiny_checkpoint):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    plain = load_model(tiny_checkpoint, snac=None, dtype=dtype)
    packed = load_model(tiny_checkpoint, dtype=dtype)
    assert accelerate_(packed.lm) and not accelerate_(packed.lm)  # once only
    # fp32 greedy heads are screened through bf16 where the CPU has a fast bf16 kernel
    assert getattr(packed.lm, "screened_heads", False) == (dtype == torch.float32 and fast_bf16())
    # decode steps take the few_rows kernel where it builds (bf16: up to two sessions)
    fc = packed.lm.transformer.h[0].mlp.fc_1
    assert (fc.few_packed is not None) == (few_rows.kernel() is not None)
    assert (packed.lm.text_logits.few_packed is not None) == (dtype == torch.bfloat16 and few_rows.kernel() is not None)
    # and fp32 decode steps attend through the fused kernel where it builds
    fused = isinstance(packed.lm.transformer.h[0].attn, DecodeAttention)
    assert fused == (dtype == torch.float32 and decode_attention.kernel() is not None)
    return plain, packed


def test_prepacked_model_generates_the_plain_models_tokens(packed_pair):
    plain, packed = packed_pair
    for seed in (1, 2):
        prompt, embeds = plain.encode_question(question(seed))
        ref = generate(plain.lm, prompt, embeds, 24)
        got = generate(packed.lm, prompt, embeds, 24)
        assert got.audio_tokens == ref.audio_tokens and got.text_tokens == ref.text_tokens


def test_engine_on_prepacked_weights_gives_each_turn_its_plain_tokens(packed_pair):
    """fp32: six concurrent turns (2 to 12 rows a step, all through the few_rows kernel where it
    builds) against plain solo references (MKL). bf16 rounds every layer's output to 8 bits of
    mantissa, so a different batch size (a different kernel, packed or not) may flip a token
    there: bf16 is checked on one session (few_rows on the packed side, oneDNN/MKL on the plain
    one: fp32 sums in another order, rounded to bf16 alike; the tiny model's tokens agree)."""
    plain, packed = packed_pair
    n = 6 if packed.lm.lm_head.weight.dtype == torch.float32 else 1
    with Engine(packed, EngineConfig(max_sessions=n, record_tokens=True)) as eng:
        turns = [eng.submit(TurnRequest(session_id=eng.open_session(), audio_16k=question(10 + i), max_steps=16))
                 for i in range(n)]
        dones = [next(e for e in t.events(timeout=120) if isinstance(e, TurnDone)) for t in turns]
    for i, done in enumerate(dones):
        prompt, embeds = plain.encode_question(question(10 + i))
        assert done.stats["audio_ids"] == generate(plain.lm, prompt, embeds, 16).audio_tokens, i


def test_a_sessions_decode_step_gives_the_same_bits_whatever_shares_it(packed_pair):
    """fp32 with few_rows: one session's two rows alone, or among five other sessions' rows at
    other positions, give bitwise the same hidden states (every decode step up to 32 sessions
    takes one kernel whose rows do not depend on each other, and so does its attention)."""
    _, packed = packed_pair
    lm = packed.lm
    if lm.lm_head.weight.dtype != torch.float32 or few_rows.kernel() is None:
        pytest.skip("bf16 steps of more than two sessions take oneDNN's kernel")
    g = torch.Generator().manual_seed(0)
    cache = KVCache.allocate(lm.cfg, rows=12, max_len=64)
    cache.k.normal_(generator=g), cache.v.normal_(generator=g)  # some context in every row
    ids = torch.randint(0, lm.cfg.padded_vocab_size, (12, 8, 1), generator=g)
    pos = torch.randint(5, 40, (6,), generator=g).repeat_interleave(2)[:, None]
    span = int(pos.max()) + 1
    together = lm(lm.embed(ids), KVCache(cache.k.clone(), cache.v.clone()), None, pos, span)
    for first in (0, 6):  # a session at the front and one in the middle of the batch
        rows = slice(first, first + 2)
        alone = lm(lm.embed(ids[rows]), KVCache(cache.k[:, rows].clone(), cache.v[:, rows].clone()), None,
                   pos[rows], span)
        assert torch.equal(alone, together[rows])


def test_prepack_is_a_no_op_off_the_cpu_and_for_half_precision(tiny_checkpoint):
    fp16 = load_model(tiny_checkpoint, snac=None, dtype=torch.float16)
    assert not prepack.prepack_(fp16.lm)
    assert type(fp16.lm.transformer.h[0].mlp.fc_1) is torch.nn.Linear


def test_few_rows_off_keeps_the_library_kernels_and_the_bf16_screen(tiny_checkpoint):
    model = load_model(tiny_checkpoint, snac=None)
    assert accelerate_(model.lm, few_rows=False)
    assert model.lm.transformer.h[0].mlp.fc_1.few_packed is None
    if getattr(model.lm, "screened_heads", False):
        assert model.lm.text_argmax.int8 is None and model.lm.audio_argmax.int8 is None
