"""Screened greedy heads (streaming/cpu/screened_argmax.py): the fp32 argmax, read from a bf16 or
an int8 copy (the int8 screen runs on the few_rows kernel, where it builds)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2.model.bundle import load_model
from omni2.model.generate import generate
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.messages import TurnDone, TurnRequest
from omni2.streaming.cpu import features as cpu_features, few_rows
from omni2.streaming.cpu.screened_argmax import INT8_SCREEN_ROWS, INT8_VNNI_ROWS, ScreenedArgmax, screen_heads_

from cpu_marks import needs  # noqa: E402

_AVX512 = needs("avx512", "cc")  # the int8 screen runs on the AVX-512 few_rows kernel
_VNNI = needs("vnni")  # int8 x int8 products
# int8: the rows quantized too (VNNI); int8-widened: int8 weights widened to fp32 sums
SCREENS = ["bf16", pytest.param("int8", marks=[_AVX512, _VNNI]), pytest.param("int8-widened", marks=_AVX512)]


def make_head(weight, groups=1, screen="bf16"):
    """A screened head whose calls of up to INT8_SCREEN_ROWS rows take `screen`."""
    if screen == "bf16":
        return ScreenedArgmax(weight, groups)
    kernel = few_rows.kernel()
    assert kernel is not None, "an AVX-512 machine with a compiler must build few_rows (see the log)"
    if screen == "int8-widened":
        kernel = copy.copy(kernel)
        kernel.vnni = False
    head = ScreenedArgmax(weight, groups, int8=kernel)
    assert head.screen(1) is head.int8 and head.int8.vnni == (screen == "int8")
    return head


def full_argmax(hidden, weight, groups):
    ids = F.linear(hidden, weight).view(hidden.size(0), groups, weight.size(0) // groups).argmax(-1)
    return ids[:, 0] if groups == 1 else ids


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("groups", [1, 7])
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_equals_the_fp32_argmax_on_random_heads(groups, rows, screen):
    g = torch.Generator().manual_seed(rows * 10 + groups)
    weight = 0.03 * torch.randn(7 * 600, 128, generator=g)
    head = make_head(weight, groups, screen)
    for scale in (0.1, 1.0, 30.0):
        hidden = scale * torch.randn(rows, 128, generator=g)
        assert torch.equal(head(hidden), full_argmax(hidden, weight, groups))
    if rows:  # it screened: far fewer exact rows than the head has
        assert groups <= head.candidates < 0.05 * rows * weight.size(0)


@pytest.mark.parametrize("screen", SCREENS)
def test_the_error_bound_holds_for_every_row(screen):
    g = torch.Generator().manual_seed(5)
    # rows and hidden states of very different sizes, so the per-row bound is exercised;
    # a row with one outlier weight (a coarse int8 scale) and an all-zero row
    weight = torch.randn(3000, 256, generator=g) * torch.logspace(-3, 1, 3000)[:, None]
    weight[7, 3] = 500.0
    weight[8] = 0.0
    head = make_head(weight, screen=screen)
    hidden = torch.randn(4, 256, generator=g) * torch.tensor([[1e-3], [1.0], [50.0], [1e3]])
    err = (head.approximate(hidden).double() - hidden.double() @ weight.double().t()).abs()
    bound = head.bound(hidden).double()
    assert bool((err <= bound).all())
    assert float((err[bound > 0] / bound[bound > 0]).max()) > 1e-3  # the bound is not vacuous either
    assert torch.equal(head(hidden), F.linear(hidden, weight).argmax(-1))


@_AVX512
def test_few_rows_screen_in_int8_and_many_in_bf16():
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(2000, 96, generator=g)
    head = make_head(weight, screen="int8" if cpu_features.has("vnni") else "int8-widened")
    assert head.int8_rows == (INT8_VNNI_ROWS if head.int8.vnni else INT8_SCREEN_ROWS)
    assert head.screen(head.int8_rows) is head.int8 and head.screen(head.int8_rows + 1) is head.bf16
    for rows in (INT8_SCREEN_ROWS, head.int8_rows, head.int8_rows + 1, 20):
        hidden = torch.randn(rows, 96, generator=g)
        assert torch.equal(head(hidden), F.linear(hidden, weight).argmax(-1))


@pytest.mark.parametrize("screen", SCREENS)
def test_near_ties_and_exact_ties_resolve_as_the_full_head_does(screen):
    """Rows that differ below bf16 resolution (identical approximations) and duplicated rows:
    the first of the fp32 maxima wins, as torch.argmax over all logits picks it."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 64, generator=g)
    weight = 0.01 * torch.randn(500, 64, generator=g)
    best = hidden[0] / hidden[0].norm()
    weight[100] = best
    weight[300] = best * (1 + 2 ** -20)  # larger in fp32, equal in bf16
    weight[400] = best * (1 + 2 ** -20)  # an exact tie with row 300
    head = make_head(weight, screen=screen)
    assert int(head(hidden)) == int(F.linear(hidden, weight).argmax()) == 300
    weight[50] = weight[300]  # now an earlier exact tie
    head = make_head(weight, screen=screen)
    assert int(head(hidden)) == int(F.linear(hidden, weight).argmax()) == 50


@pytest.mark.parametrize("screen", SCREENS)
def test_a_cluster_of_rows_closer_than_the_screen_can_tell_is_ranked_in_fp32(screen):
    """50 rows within 1e-4 (relative) of each other: their approximate logits are in the wrong
    order (checked), the screened pick is still the fp32 one."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(1, 64, generator=g)
    weight = 0.01 * torch.randn(400, 64, generator=g)
    best = hidden[0] / hidden[0].norm()
    weight[200:250] = best * (1 + 1e-4 * torch.randn(50, 1, generator=g)) + 1e-5 * torch.randn(50, 64, generator=g)
    head = make_head(weight, screen=screen)
    exact = int(F.linear(hidden, weight).argmax())
    assert int(head.approximate(hidden).argmax()) != exact  # the screen alone would pick wrongly
    assert int(head(hidden)) == exact


@pytest.mark.parametrize("screen", SCREENS)
def test_a_non_finite_hidden_state_reads_the_whole_head(screen):
    weight = torch.randn(200, 32)
    hidden = torch.randn(2, 32)
    hidden[1, 3] = float("nan")
    assert torch.equal(make_head(weight, screen=screen)(hidden), full_argmax(hidden, weight, 1))


def test_only_fp32_weights_split_into_equal_groups():
    with pytest.raises(ValueError):
        ScreenedArgmax(torch.randn(10, 4).bfloat16())
    with pytest.raises(ValueError):
        ScreenedArgmax(torch.randn(10, 4), groups=3)


def test_a_screened_model_generates_the_plain_models_tokens(tiny_checkpoint, tiny_model):
    """The engine's greedy picks go through lm.text_argmax / lm.audio_argmax; on the tiny
    checkpoint they must give `generate`'s tokens step for step, text included."""
    screened = load_model(tiny_checkpoint)
    if not screen_heads_(screened.lm):
        pytest.skip("no fast bf16 kernel on this CPU: heads are not screened")
    assert not screen_heads_(screened.lm)  # once only
    audio = (0.1 * np.random.RandomState(3).randn(9600)).astype(np.float32)
    prompt, embeds = tiny_model.encode_question(audio)
    ref = generate(tiny_model.lm, prompt, embeds, 24)
    with Engine(screened, EngineConfig(max_sessions=2, record_tokens=True)) as eng:
        turn = eng.submit(TurnRequest(session_id=eng.open_session(), audio_16k=audio, max_steps=24))
        done = next(e for e in turn.events(timeout=120) if isinstance(e, TurnDone))
    assert done.stats["audio_ids"] == ref.audio_tokens
    assert done.stats["text_ids"] == ref.text_tokens
