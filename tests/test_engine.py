"""The engine on the tiny model: batching, cancellation, streaming audio, multi-turn context.

The bar everywhere is the reference loop in omni2.model.generate: the engine may batch,
chunk and stream, but the tokens of every turn must be exactly its solo reference tokens.
"""
import time

import numpy as np
import pytest
import torch

from omni2.model import tokens as tk
from omni2.model.generate import generate
from omni2.model.lm import KVCache
from omni2.model.snac_codec import decode_frames
from omni2.model.snac_layout import frames_from_steps, sanitize_frames
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine, EngineFull
from omni2.streaming.engine.messages import AudioChunk, ContextTruncated, TextDelta, TurnDone, TurnRequest
from omni2.streaming.engine.slots import Slot, TurnRecord, make_room

from cpu_marks import not_under_isa_emulation  # noqa: E402


def question(seed, seconds=0.6):
    rng = np.random.RandomState(seed)
    return (0.1 * rng.randn(int(16000 * seconds))).astype(np.float32)


def image_bytes(seed):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def reference(model, audio, steps, image=None):
    prompt, embeds = model.encode_question(audio, image=image)
    return generate(model.lm, prompt, embeds, steps)


def collect(turn, timeout=120):
    audio, text, other = [], "", []
    for ev in turn.events(timeout=timeout):
        if isinstance(ev, AudioChunk):
            audio.append(ev.pcm)
        elif isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, TurnDone):
            done = ev
        else:
            other.append(ev)
    pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return done, pcm, text, other


@pytest.fixture()
def engine(tiny_model):
    # no headroom admission: these tests judge tokens, and on a loaded shared CPU a turn could
    # be refused for step time (admission has its own tests: test_admission.py)
    eng = Engine(tiny_model, EngineConfig(max_sessions=8, record_tokens=True, prefill_chunk=16, step_budget_share=0))
    eng.start()
    yield eng
    eng.stop()


def test_single_turn_equals_reference_and_streams_audio(engine, tiny_model):
    audio = question(0)
    ref = reference(tiny_model, audio, 30)
    sid = engine.open_session()
    done, pcm, text, _ = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=30)))
    assert done.reason == "max_steps"
    assert done.stats["text_ids"] == ref.text_tokens
    assert done.stats["audio_ids"] == ref.audio_tokens
    assert text == done.text == tiny_model.tokenizer.decode_answer(ref.text_tokens)
    # streamed audio == one-shot SNAC decode of the whole answer, tail included
    frames, _ = sanitize_frames(frames_from_steps(ref.audio_tokens))
    whole = decode_frames(tiny_model.snac, frames)[0].numpy()
    assert done.frames_generated == done.frames_emitted == len(frames)
    assert pcm.shape == whole.shape
    assert np.abs(pcm - whole).max() < 1e-3


def test_image_turn_equals_reference(engine, tiny_model):
    audio, img = question(1), image_bytes(1)
    ref = reference(tiny_model, audio, 20, image=img)
    sid = engine.open_session()
    done, _, _, _ = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=audio, image=img, max_steps=20)))
    assert done.stats["prompt_positions"] == 55 + 31  # L + 55 positions, L = 0.6 s / 20 ms + 1
    assert done.stats["audio_ids"] == ref.audio_tokens
    assert done.stats["text_ids"] == ref.text_tokens


def wait_for_a_free_slot(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not any(slot.session is None for slot in engine.slots):
        assert time.monotonic() < deadline, "a closed session's slot was never freed"
        time.sleep(0.01)


def test_concurrent_turns_each_get_their_solo_tokens(engine, tiny_model):
    """8 turns started at different times, different lengths, some slots reused."""
    plans = [(i, 0.3 + 0.1 * (i % 4), 12 + 5 * (i % 3)) for i in range(10)]
    refs = {i: reference(tiny_model, question(100 + i, s), n) for i, s, n in plans}
    turns, sessions, results = {}, {}, {}
    for i, s, n in plans:
        if i >= 8:  # reuse: wait for an earlier conversation to end, close it, open a new one
            old = i - 8
            results[old] = collect(turns[old])
            engine.close_session(sessions[old])
            wait_for_a_free_slot(engine)  # (the engine frees a closed session's slot between steps)
        sessions[i] = engine.open_session()
        turns[i] = engine.submit(TurnRequest(session_id=sessions[i], audio_16k=question(100 + i, s), max_steps=n))
        time.sleep(0.02 * (i % 3))
    for i, _, _ in plans:
        done, pcm, _, _ = results[i] if i in results else collect(turns[i])
        assert done.reason == "max_steps", (i, done)
        assert done.stats["audio_ids"] == refs[i].audio_tokens, i
        assert done.stats["text_ids"] == refs[i].text_tokens, i
        assert pcm.size == max(0, len(refs[i].audio_tokens) - 7) * 2048


def test_cancel_mid_turn_frees_the_slot_and_later_turns_are_unaffected(engine, tiny_model):
    sid = engine.open_session()
    turn = engine.submit(TurnRequest(session_id=sid, audio_16k=question(7), max_steps=1000))
    for ev in turn.events(timeout=60):
        if isinstance(ev, AudioChunk):
            break
    turn.cancel()
    done, _, _, _ = collect(turn)
    assert done.reason == "cancelled"
    assert 0 < done.frames_emitted <= done.frames_generated < 1000
    turn.cancel()  # cancelling a finished turn is a no-op
    deadline = time.time() + 10
    while engine.stats()["live_turns"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["live_turns"] == 0
    engine.close_session(sid)
    # a fresh conversation afterwards gets exactly its solo tokens
    sid2 = engine.open_session()
    ref = reference(tiny_model, question(8), 15)
    done2, _, _, _ = collect(engine.submit(TurnRequest(session_id=sid2, audio_16k=question(8), max_steps=15)))
    assert done2.stats["audio_ids"] == ref.audio_tokens


def test_new_question_replaces_the_live_answer(engine):
    sid = engine.open_session()
    first = engine.submit(TurnRequest(session_id=sid, audio_16k=question(9), max_steps=1000))
    second = engine.submit(TurnRequest(session_id=sid, audio_16k=question(10), max_steps=10))
    assert collect(first)[0].reason == "cancelled"
    assert collect(second)[0].reason == "max_steps"


def test_sessions_are_limited_and_bad_input_is_refused(tiny_model):
    with Engine(tiny_model, EngineConfig(max_sessions=2)) as eng:
        eng.open_session(), eng.open_session()
        with pytest.raises(EngineFull):
            eng.open_session()
        with pytest.raises(ValueError):
            eng.submit(TurnRequest(session_id="nope", audio_16k=question(0)))
        sid = next(iter(eng._sessions))
        done, _, _, _ = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(0), image=b"not an image")))
        assert done.reason == "error" and "image" in done.error


def test_multi_turn_context_turn_two_sees_turn_one(engine, tiny_model):
    lm = tiny_model.lm
    sid = engine.open_session()
    q1, q2 = question(20), question(21)
    d1, _, _, _ = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=q1, max_steps=12)))
    d2, _, _, _ = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=q2, max_steps=12)))
    p1, e1 = tiny_model.encode_question(q1)
    p2, e2 = tiny_model.encode_question(q2)
    # turn 1 kept 12 steps; its last step's tokens were never fed: context = T1 + 11
    assert d2.stats["context_start"] == p1.length + 11
    # reference: one sequence = prompt1, turn-1 fed steps, prompt2; then greedy decoding
    fed = [torch.tensor(_feed(a, t)) for a, t in zip(d1.stats["audio_ids"][:-1], d1.stats["text_ids"][:-1])]
    with torch.inference_mode():
        seq = torch.cat([e1, lm.embed(torch.stack(fed, dim=2)), e2], dim=1)  # fed: [2, 8, 11]
    start = d2.stats["context_start"]
    assert seq.shape[1] == start + p2.length
    ref_audio = _greedy_continue(lm, seq, 12)
    assert d2.stats["audio_ids"] == ref_audio
    solo = reference(tiny_model, q2, 12)
    assert d2.stats["audio_ids"] != solo.audio_tokens  # it did see turn 1


def test_a_truncated_answer_leaves_only_its_heard_steps_in_the_context(engine, tiny_model):
    """forget(..., "answer", keep_steps): the next turn's prompt starts right after the kept
    steps, and the model reads exactly prompt 1, the kept steps, prompt 2. A live answer's cut
    waits for its cancel; a cut that keeps every step changes nothing."""
    lm = tiny_model.lm
    sid = engine.open_session()
    q1, q2 = question(22), question(23)
    t1 = engine.submit(TurnRequest(session_id=sid, audio_16k=q1, max_steps=12))
    d1 = collect(t1)[0]
    engine.forget(sid, t1.id, "answer", keep_steps=5)
    d2 = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=q2, max_steps=12)))[0]
    p1, e1 = tiny_model.encode_question(q1)
    _, e2 = tiny_model.encode_question(q2)
    assert d2.stats["context_start"] == p1.length + 5
    fed = [torch.tensor(_feed(a, t)) for a, t in zip(d1.stats["audio_ids"][:5], d1.stats["text_ids"][:5])]
    with torch.inference_mode():
        seq = torch.cat([e1, lm.embed(torch.stack(fed, dim=2)), e2], dim=1)
    assert d2.stats["audio_ids"] == _greedy_continue(lm, seq, 12)
    end2 = d2.stats["context_start"] + d2.stats["prompt_positions"] + 11
    t3 = engine.submit(TurnRequest(session_id=sid, audio_16k=question(24), max_steps=400))
    assert next(e for e in t3.events(timeout=120) if isinstance(e, AudioChunk)) is not None
    engine.forget(sid, t3.id, "answer", keep_steps=3)  # a live answer: waits until its cancel ends it
    t3.cancel()
    d3 = collect(t3)[0]
    assert d3.reason == "cancelled" and d3.stats["context_start"] == end2
    t4 = engine.submit(TurnRequest(session_id=sid, audio_16k=question(25), max_steps=4))
    d4 = collect(t4)[0]
    start4 = end2 + d3.stats["prompt_positions"] + 3
    assert d4.stats["context_start"] == start4
    engine.forget(sid, t4.id, "answer", keep_steps=99)  # keeps every step: nothing changes
    d5 = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=question(26), max_steps=4)))[0]
    assert d5.stats["context_start"] == start4 + d4.stats["prompt_positions"] + 3


def test_steps_heard_keeps_only_steps_of_fully_played_frames():
    from omni2.model.snac_layout import SAMPLES_PER_FRAME, frames_from_steps, steps_heard

    assert steps_heard(0) == 0 and steps_heard(SAMPLES_PER_FRAME - 1) == 0
    assert steps_heard(SAMPLES_PER_FRAME) == 2 and steps_heard(5 * SAMPLES_PER_FRAME + 7) == 6
    # every token of the kept steps belongs to a heard frame (or to none: the first steps)
    steps = [[100 * s + a for a in range(7)] for s in range(20)]
    frames = frames_from_steps(steps)
    for heard in range(1, 10):
        kept = {tok for row in steps[: steps_heard(heard * SAMPLES_PER_FRAME)] for tok in row}
        unheard = {int(t) for t in frames[heard:].flatten()}
        assert not kept & unheard
        assert steps_heard(heard * SAMPLES_PER_FRAME) == heard + 1


def _feed(audio, text):
    from omni2.streaming.engine.slots import feed_ids

    return feed_ids(audio, text)


def _greedy_continue(lm, embeds, steps):
    T = embeds.shape[1]
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=T + steps)
    with torch.inference_mode():
        h = lm(embeds, cache, None, torch.arange(T)[None].expand(2, T), span=T)[:, -1]
        out = []
        from omni2.model.generate import EndRules

        rules = EndRules()
        audio = text = None
        for step in range(steps):
            if step:
                ids = torch.tensor(_feed(audio, text))[:, :, None]
                h = lm(lm.embed(ids), cache, None, torch.full((2, 1), T + step - 1), span=T + step)[:, -1]
            audio = lm.audio_logits(h[0]).argmax(-1).tolist()
            stop, text = rules.apply(step, audio, int(lm.text_logits(h[1]).argmax(-1)))
            if stop:
                break
            out.append(audio)
    return out


def wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_held_turn_is_silent_until_released_then_equals_reference(engine, tiny_model):
    """A speculative turn prefills at once but emits nothing before release(); released, it
    speaks exactly its solo tokens, and its latency counts from the release."""
    sid, other = engine.open_session(), engine.open_session()
    q = question(60)
    turn = engine.submit(TurnRequest(session_id=sid, audio_16k=q, max_steps=12, hold=True))
    slot = engine._sessions[sid]
    wait_for(lambda: slot.phase == "held")
    # another session's answer runs to the end meanwhile, untouched by the held rows
    d_other = collect(engine.submit(TurnRequest(session_id=other, audio_16k=question(61), max_steps=12)))[0]
    assert d_other.stats["audio_ids"] == reference(tiny_model, question(61), 12).audio_tokens
    with pytest.raises(Exception):  # queue.Empty: nothing was said while held
        turn.get(timeout=0.2)
    time.sleep(0.3)
    turn.release()
    done, pcm, text, _ = collect(turn)
    ref = reference(tiny_model, q, 12)
    assert done.reason == "max_steps" and pcm.size > 0
    assert done.stats["audio_ids"] == ref.audio_tokens and done.stats["text_ids"] == ref.text_tokens
    assert done.stats["time_to_first_audio_s"] < time.perf_counter() - turn.submitted_at - 0.3


def test_cancelled_held_turn_leaves_no_trace_in_the_context(engine, tiny_model):
    """An unused speculation is forgotten: the session's next turn starts where the context
    was before it, with the tokens it would have had without the speculation."""
    sid = engine.open_session()
    d1 = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=question(70), max_steps=10)))[0]
    spec = engine.submit(TurnRequest(session_id=sid, audio_16k=question(71, seconds=1.0), max_steps=10, hold=True))
    wait_for(lambda: engine._sessions[sid].phase == "held")
    spec.cancel()
    done_spec = collect(spec)[0]
    assert done_spec.reason == "cancelled" and done_spec.frames_generated == 0
    d2 = collect(engine.submit(TurnRequest(session_id=sid, audio_16k=question(72), max_steps=10)))[0]
    p1, _ = tiny_model.encode_question(question(70))
    assert d2.stats["context_start"] == p1.length + 9  # as if the speculation never happened
    sid_b = engine.open_session()  # the same two turns without any speculation
    collect(engine.submit(TurnRequest(session_id=sid_b, audio_16k=question(70), max_steps=10)))
    d2_b = collect(engine.submit(TurnRequest(session_id=sid_b, audio_16k=question(72), max_steps=10)))[0]
    assert d2.stats["audio_ids"] == d2_b.stats["audio_ids"]
    assert d1.reason == "max_steps"


def test_make_room_drops_oldest_turns_and_rerotates_keys(tiny_model):
    """After dropping d positions, layer-0 keys/values equal a fresh prefill of the kept
    positions at positions 0.. (re-rotation is exact). Deeper layers keep what attention mixed
    in from the dropped turns: truncation forgets the tokens, not their traces, by design."""
    lm = tiny_model.lm
    cfg = lm.cfg
    x = torch.randn(2, 30, cfg.n_embd)
    cache = KVCache.allocate(cfg, rows=2, max_len=40)
    with torch.inference_mode():
        lm(x, cache, None, torch.arange(30)[None].expand(2, 30), span=30)
        slot = Slot(0, session="s", ctx=30, records=[TurnRecord(0), TurnRecord(12), TurnRecord(22)])
        dropped = make_room(cache, slot, need=20, limit=40, rope_cos=lm.rope_cos, rope_sin=lm.rope_sin)
        assert dropped == 12 and slot.ctx == 18 and slot.turn_starts == [0, 10]
        fresh = KVCache.allocate(cfg, rows=2, max_len=40)
        lm(x[:, 12:], fresh, None, torch.arange(18)[None].expand(2, 18), span=18)
    torch.testing.assert_close(cache.k[0, :, :, :18], fresh.k[0, :, :, :18], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.v[0, :, :, :18], fresh.v[0, :, :, :18], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cache.k[0, :, :, :18], cache.k[0, :, :, 12:30])  # keys really moved


def test_full_context_truncates_oldest_turn_and_says_so(tiny_model):
    with Engine(tiny_model, EngineConfig(max_sessions=1, max_context=120, record_tokens=True)) as eng:
        sid = eng.open_session()
        d1 = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(30), max_steps=20)))[0]
        done, _, _, other = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(31), max_steps=40)))
        assert d1.reason == "max_steps"
        cut = [o for o in other if isinstance(o, ContextTruncated)]
        assert len(cut) == 1 and cut[0].dropped_positions > 0 and cut[0].dropped_turns == 1
        assert done.reason == "max_steps" and done.stats["context_start"] == 0


def test_sampling_is_seeded_and_differs_from_greedy(tiny_model):
    from omni2.streaming.engine.messages import SamplingParams

    outs = []
    for _ in range(2):
        with Engine(tiny_model, EngineConfig(max_sessions=1, record_tokens=True, seed=5)) as eng:
            sid = eng.open_session()
            sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
            outs.append(collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(40), sampling=sp, max_steps=10)))[0])
    assert outs[0].stats["audio_ids"] == outs[1].stats["audio_ids"]
    assert outs[0].stats["audio_ids"] != reference(tiny_model, question(40), 10).audio_tokens


@pytest.mark.slow
@not_under_isa_emulation
def test_compiled_decode_step_gives_the_same_tokens(tiny_model):
    """torch.compile (CPU inductor here; CUDA graphs on a GPU) must not change a token."""
    ref = reference(tiny_model, question(50), 20)
    with Engine(tiny_model, EngineConfig(max_sessions=2, record_tokens=True, compile="default")) as eng:
        sid = eng.open_session()
        done = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(50), max_steps=20)), timeout=900)[0]
    assert done.reason == "max_steps", done.error
    assert done.stats["audio_ids"] == ref.audio_tokens
    assert done.stats["text_ids"] == ref.text_tokens


def test_off_the_cpu_decode_steps_attend_to_a_bucketed_span_with_the_same_tokens(tiny_model):
    """On a GPU the attended span is rounded up to compile_span_bucket (cuDNN builds an
    attention plan per shape: 70 ms a step on an H200 while the span grew every step); the
    positions past each row's own are masked, so the tokens stay the reference's. Exercised
    on the CPU by telling the engine it is not on one."""
    ref = reference(tiny_model, question(51), 20)
    spans = []
    with Engine(tiny_model, EngineConfig(max_sessions=2, record_tokens=True, compile_span_bucket=64)) as eng:
        eng.host.bucket_span = True  # as a GPU host does
        forward = eng.executor.forward
        eng.executor.forward = lambda ids, pos, k, v, span: spans.append((int(pos.max()), span)) or forward(ids, pos, k, v, span)
        sid = eng.open_session()
        done = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(51), max_steps=20)))[0]
    assert done.stats["audio_ids"] == ref.audio_tokens and done.stats["text_ids"] == ref.text_tokens
    assert len(spans) == 19 and all(span % 64 == 0 and span > top for top, span in spans)
    assert len({span for _, span in spans}) < len(spans)  # (the positions moved, the span did not)


def test_turns_whose_text_ended_match_the_reference(tiny_model):
    """A model that writes `eot` early: after it the engine skips the text head for that slot,
    and every token still equals the reference (which forces pad_t there)."""
    import copy
    import dataclasses

    lm = copy.deepcopy(tiny_model.lm)
    # eot takes over from the text token the model writes most: same direction, larger logit
    common = max(set(t := reference(tiny_model, question(60), 25).text_tokens[1:]), key=t.count)
    with torch.no_grad():
        lm.lm_head.weight[tk.EOT] = 1.5 * lm.lm_head.weight[common]
    model = dataclasses.replace(tiny_model, lm=lm)
    refs = [reference(model, question(60 + i), 25) for i in range(3)]
    assert all(tk.EOT in r.text_tokens[1:] for r in refs)  # the text really ends mid-turn
    with Engine(model, EngineConfig(max_sessions=3, record_tokens=True)) as eng:
        sids = [eng.open_session() for _ in range(3)]
        turns = [eng.submit(TurnRequest(session_id=s, audio_16k=question(60 + i), max_steps=25))
                 for i, s in enumerate(sids)]
        dones = [collect(t)[0] for t in turns]
    for done, ref in zip(dones, refs):
        assert done.stats["text_ids"] == ref.text_tokens
        assert done.stats["audio_ids"] == ref.audio_tokens


def test_model_interrupt_token_ends_the_answer_when_the_checkpoint_defines_one(tiny_model):
    """Off for the released weights (no ids); a checkpoint listing interrupt ids in
    model_config.yaml gets its answer stopped at the first one the model writes."""
    import copy
    import dataclasses

    assert tiny_model.lm.cfg.interrupt_token_ids == ()
    ref = reference(tiny_model, question(70), 30)
    stop_at = next(i for i in range(1, 30) if ref.text_tokens[i] != ref.text_tokens[0])
    lm = copy.deepcopy(tiny_model.lm)
    lm.cfg = dataclasses.replace(lm.cfg, interrupt_token_ids=(ref.text_tokens[stop_at],))
    model = dataclasses.replace(tiny_model, lm=lm)
    with Engine(model, EngineConfig(max_sessions=1, record_tokens=True)) as eng:
        sid = eng.open_session()
        done = collect(eng.submit(TurnRequest(session_id=sid, audio_16k=question(70), max_steps=30)))[0]
    assert done.reason == "interrupted"
    assert done.stats["text_ids"] == ref.text_tokens[:stop_at]  # the interrupt token is not kept


def test_interrupt_ids_round_trip_through_model_config(tmp_path):
    import dataclasses

    import yaml

    from omni2.model.config import PRESETS, ModelConfig

    cfg = dataclasses.replace(PRESETS["tiny"], interrupt_token_ids=(151950,))
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    assert ModelConfig.from_yaml(path).interrupt_token_ids == (151950,)
    assert "interrupt_token_ids" not in PRESETS["tiny"].to_yaml_dict()
