"""Editing a session's context on the tiny model: forgetting turns, context-only turns
(what the assistant said, system text), the minimal question, out-of-band answers.

The bar: after an edit, the next answer's tokens are exactly the greedy continuation of the
context as if the edit had always been so (the reference builds that sequence by hand).
"""
import numpy as np
import pytest
import torch

from omni2.streaming.engine.messages import AudioChunk, TurnRequest
from test_engine import _feed, _greedy_continue, collect, engine, question, wait_for  # noqa: F401 (fixture)


def ask(engine, sid, audio=None, text=None, steps=10, **kw):
    turn = engine.submit(TurnRequest(session_id=sid, audio_16k=audio, text=text, max_steps=steps, **kw))
    return turn, collect(turn)[0]


def fed_embeds(lm, done):
    """Embeddings of what an answer fed back into the context (its last step is never fed)."""
    fed = [torch.tensor(_feed(a, t)) for a, t in zip(done.stats["audio_ids"][:-1], done.stats["text_ids"][:-1])]
    with torch.inference_mode():
        return lm.embed(torch.stack(fed, dim=2))


def cat(*parts):
    return torch.cat(parts, dim=1)


def test_forgetting_the_last_answer_rewinds_to_its_question(engine, tiny_model):
    sid = engine.open_session()
    t1, d1 = ask(engine, sid, question(1), steps=10)
    engine.forget(sid, t1.id, "answer")
    _, d2 = ask(engine, sid, question(2), steps=10)
    p1, e1 = tiny_model.encode_question(question(1))
    _, e2 = tiny_model.encode_question(question(2))
    assert d1.reason == "max_steps" and d2.stats["context_start"] == p1.length
    assert d2.stats["audio_ids"] == _greedy_continue(tiny_model.lm, cat(e1, e2), 10)


def test_forgetting_an_earlier_turn_replays_the_later_ones(engine, tiny_model):
    """Turn 1 goes; turn 2 (question and answer) is re-prefilled at position 0, so the next
    answer is the continuation of [turn 2, question 3]: turn 1 is nowhere in its prompt."""
    lm = tiny_model.lm
    sid = engine.open_session()
    t1, _ = ask(engine, sid, question(11), steps=8)
    _, d2 = ask(engine, sid, question(12), steps=9)
    engine.forget(sid, t1.id)
    _, d3 = ask(engine, sid, question(13), steps=10)
    p2, e2 = tiny_model.encode_question(question(12))
    _, e3 = tiny_model.encode_question(question(13))
    assert d3.stats["context_start"] == p2.length + 8
    assert d3.stats["audio_ids"] == _greedy_continue(lm, cat(e2, fed_embeds(lm, d2), e3), 10)


def test_forgetting_a_question_keeps_its_answer(engine, tiny_model):
    lm = tiny_model.lm
    sid = engine.open_session()
    t1, d1 = ask(engine, sid, question(21), steps=8)
    engine.forget(sid, t1.id, "prompt")
    _, d2 = ask(engine, sid, question(22), steps=10)
    _, e2 = tiny_model.encode_question(question(22))
    assert d2.stats["context_start"] == 7
    assert d2.stats["audio_ids"] == _greedy_continue(lm, cat(fed_embeds(lm, d1), e2), 10)


def test_context_only_turns_say_nothing_and_the_next_answer_sees_them(engine, tiny_model):
    sid = engine.open_session()
    said = engine.submit(TurnRequest(session_id=sid, text="hello there", role="assistant", answer=False))
    done, pcm, text, _ = collect(said)
    assert (done.reason, done.frames_generated, pcm.size, text) == ("completed", 0, 0, "")
    collect(engine.submit(TurnRequest(session_id=sid, text="be brief", role="system", answer=False)))
    _, d = ask(engine, sid, question(31), steps=10)
    _, ea = tiny_model.encode_text("assistant", "hello there")
    _, es = tiny_model.encode_text("system", "be brief")
    _, eq = tiny_model.encode_question(question(31))
    assert d.stats["context_start"] == ea.shape[1] + es.shape[1]
    assert d.stats["audio_ids"] == _greedy_continue(tiny_model.lm, cat(ea, es, eq), 10)


def test_a_context_turn_waits_for_the_live_answer_instead_of_cancelling_it(engine, tiny_model):
    sid = engine.open_session()
    live = engine.submit(TurnRequest(session_id=sid, audio_16k=question(41), max_steps=30))
    wait_for(lambda: engine._sessions[sid].phase == "decode")
    ctx = engine.submit(TurnRequest(session_id=sid, text="noted", role="assistant", answer=False))
    d_live, d_ctx = collect(live)[0], collect(ctx)[0]
    assert d_live.reason == "max_steps" and d_ctx.reason == "completed"
    p, _ = tiny_model.encode_question(question(41))
    _, e = tiny_model.encode_text("assistant", "noted")
    assert d_ctx.stats["context_start"] == p.length + 29
    # a question, unlike a context turn, replaces the live answer at once
    engine.submit(TurnRequest(session_id=sid, audio_16k=question(42), max_steps=200))
    wait_for(lambda: engine._sessions[sid].phase == "decode")
    _, d = ask(engine, sid, question(43), steps=4)
    assert d.reason == "max_steps"


def test_the_minimal_question_answers_from_the_context(engine, tiny_model):
    sid = engine.open_session()
    _, d1 = ask(engine, sid, text="", steps=6)
    assert d1.stats["prompt_positions"] == 3 and d1.reason in ("max_steps", "completed")
    with pytest.raises(ValueError):
        engine.submit(TurnRequest(session_id=sid))
    with pytest.raises(ValueError):
        engine.submit(TurnRequest(session_id=sid, text="x", role="assistant"))  # must be answer=False


def test_an_out_of_band_answer_leaves_no_trace_in_the_context(engine, tiny_model):
    sid, sid_b = engine.open_session(), engine.open_session()
    for s in (sid, sid_b):
        ask(engine, s, question(51), steps=6)
    turn, oob = ask(engine, sid, question(52), steps=8, keep=False)
    assert oob.reason == "max_steps"
    _, d = ask(engine, sid, question(53), steps=8)
    _, d_b = ask(engine, sid_b, question(53), steps=8)
    assert d.stats["context_start"] == d_b.stats["context_start"]
    assert d.stats["audio_ids"] == d_b.stats["audio_ids"]


def test_a_forgotten_turn_that_never_ran_is_ignored_and_audio_keeps_flowing(engine, tiny_model):
    sid = engine.open_session()
    engine.forget(sid, 10 ** 9)
    turn = engine.submit(TurnRequest(session_id=sid, audio_16k=question(61), max_steps=12))
    events = list(turn.events(timeout=120))
    assert any(isinstance(e, AudioChunk) for e in events) and events[-1].reason == "max_steps"
    with pytest.raises(ValueError):
        engine.forget(sid, turn.id, "everything")
    assert np.isfinite(engine.stats()["free_slots"])
