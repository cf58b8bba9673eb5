"""First-audio admission counts the answers that have no audio yet (Engine._starting). An
answer that ends without ever making audio (cut short, cancelled, failed, its session
closed) leaves that count when it ends, not at some later submit."""
from __future__ import annotations

import numpy as np

from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.messages import AudioChunk, TurnDone, TurnRequest


def _end(turn) -> list:
    events = list(turn.events(timeout=60))
    assert isinstance(events[-1], TurnDone)
    return events


def test_answers_that_end_without_audio_stop_counting_as_starting(tiny_model):
    cfg = EngineConfig(max_sessions=2, max_steps=24, first_audio_factor=2.0)
    audio = (0.1 * np.random.RandomState(0).randn(4000)).astype(np.float32)
    with Engine(tiny_model, cfg) as eng:
        sid = eng.open_session()
        # one step: the speech frames lag the text by the codebook delay, so no audio at all
        cut = eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=1))
        events = _end(cut)
        assert events[-1].reason == "max_steps" and not any(isinstance(e, AudioChunk) for e in events)
        assert eng._starting == {}

        cancelled = eng.submit(TurnRequest(session_id=sid, audio_16k=audio))
        cancelled.cancel()
        assert _end(cancelled)[-1].reason == "cancelled"
        assert eng._starting == {}

        too_long = eng.submit(TurnRequest(session_id=sid, text="hello " * eng.context_len))
        assert _end(too_long)[-1].reason == "error"
        assert eng._starting == {}

        other = eng.open_session()
        closed = eng.submit(TurnRequest(session_id=other, audio_16k=audio))
        eng.close_session(other)
        assert _end(closed)[-1].reason == "cancelled"
        assert eng._starting == {}

        spoken = eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=24))  # audio: counted out at once
        assert any(isinstance(e, AudioChunk) for e in _end(spoken))
        assert eng._starting == {}
