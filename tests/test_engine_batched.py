"""Arriving turns worked on together (issue 16): the encoders of the questions waiting run as one
batch and several prompts' chunks share a prefill call. The bar is the one-at-a-time path:
embeddings within float rounding, and every greedy token the same (and the reference's)."""
import numpy as np
import pytest
import torch

from omni2.model.generate import generate
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.admission import Decision
from omni2.streaming.engine.messages import TextDelta, TurnDone, TurnRequest

from test_engine import image_bytes, question


def _questions(model, n=5):
    """Speech of different lengths, every other one with an image."""
    return [model.question(question(200 + i, 0.3 + 0.15 * i), image=image_bytes(i) if i % 2 else None)
            for i in range(n)]


def test_a_batch_of_questions_encodes_as_each_does_alone(tiny_model):
    qs = _questions(tiny_model)
    together = tiny_model.embed_questions(qs)
    for q, embeds in zip(qs, together):
        alone = tiny_model.embed_questions([q])[0]
        assert embeds.shape == alone.shape
        # the same maths on a larger matrix product: equal up to fp32 rounding
        torch.testing.assert_close(embeds, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        tiny_model.question(np.zeros(0, np.float32))          # a bad question fails alone, before any batch
    with pytest.raises(ValueError):
        tiny_model.question(question(1), image=b"not an image")


def _answers(model, batched: bool, plans):
    """The first half of the questions is submitted before the engine starts: they wait
    together, so the batched engine encodes them in one batch and prefills their chunks in
    shared calls; the rest arrive while those answers play (prefill bounded by the frame)."""
    cfg = EngineConfig(max_sessions=len(plans), record_tokens=True, prefill_chunk=16, batched_arrivals=batched,
                       prefill_min_positions=8)
    eng = Engine(model, cfg)
    # every answer admitted (tokens are judged here; a loaded CPU could refuse one for step time)
    eng.headroom.decide = lambda live, after: Decision(True, None, eng.headroom.budget_s)

    def ask(seed, seconds, image, steps):
        sid = eng.open_session()
        return eng.submit(TurnRequest(session_id=sid, audio_16k=question(seed, seconds), max_steps=steps,
                                      image=image_bytes(seed) if image else None))

    half = len(plans) // 2
    turns = [ask(*p) for p in plans[:half]]
    with eng:
        events = turns[0].events(timeout=300)
        next(ev for ev in events if isinstance(ev, TextDelta))     # an answer plays
        turns += [ask(*p) for p in plans[half:]]
        done = [[ev for ev in t.events(timeout=300) if isinstance(ev, TurnDone)][0] for t in turns[1:]]
        done.insert(0, next(ev for ev in events if isinstance(ev, TurnDone)))
    calls = eng.executor.prefill_calls
    return [(d.reason, d.stats["text_ids"], d.stats["audio_ids"]) for d in done], calls


def test_batched_prefill_gives_the_same_greedy_tokens_as_one_prompt_at_a_time(tiny_model, monkeypatch):
    from omni2.streaming.engine.executor import ModelExecutor

    prefill = ModelExecutor.prefill

    def counting(self, chunks):
        self.prefill_calls = getattr(self, "prefill_calls", []) + [len(chunks)]
        return prefill(self, chunks)

    monkeypatch.setattr(ModelExecutor, "prefill", counting)
    plans = [(300 + i, 0.3 + 0.2 * i, i == 2, 30 + 3 * i) for i in range(4)]  # 16..56 positions
    batched, calls = _answers(tiny_model, True, plans)
    serial, serial_calls = _answers(tiny_model, False, plans)
    assert max(calls) > 1 and max(serial_calls) == 1             # prompts did share prefill calls
    assert batched == serial
    for (seed, seconds, image, steps), (reason, text, audio) in zip(plans, batched):
        prompt, embeds = tiny_model.encode_question(question(seed, seconds), image=image_bytes(seed) if image else None)
        ref = generate(tiny_model.lm, prompt, embeds, steps)
        assert (text, audio) == (ref.text_tokens, ref.audio_tokens) and reason == "max_steps"
