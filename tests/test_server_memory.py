"""Memory a session leaves behind (issue 19): counts, not RSS timings.

Real uvicorn on loopback, real websockets clients, the fake engine, the real silero-vad.
"""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, fake_engine_server  # noqa: E402

from omni2.streaming.listening.vad import silero_pool  # noqa: E402

VAD_600 = {"type": "realtime", "audio": {"input": {"turn_detection": {
    "type": "server_vad", "silence_duration_ms": 600}}}}


async def session_that_sets_its_vad(url: str) -> None:
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    await c.send("session.update", session=VAD_600)  # a new detector replaces the default one
    await c.until("session.updated")
    await c.close()


def test_sessions_that_come_and_go_reuse_their_vad_modules():
    """Each session used to load one silero module (two when it set turn_detection), ~7.5 MB
    each, and dropped them for a full gc to find; now they go back to the pool, so 12 sessions
    load at most as many modules as are open at once and the pool keeps at most max_sessions."""
    pool = silero_pool()
    pool.clear()
    with fake_engine_server(max_sessions=3) as (engine, srv):
        before = pool.loaded
        for _ in range(12):
            asyncio.run(asyncio.wait_for(session_that_sets_its_vad(srv.ws), 30))
        deadline = time.monotonic() + 10  # the last session's close runs after its socket ended
        while srv.app.state.admission.active and time.monotonic() < deadline:
            time.sleep(0.05)
        loaded = pool.loaded - before
        assert loaded <= 3, f"{loaded} silero modules loaded for 12 sessions one after another"
        assert 1 <= pool.idle <= 3  # bounded by max_sessions (create_app sets it)


class CountedDetector:
    """Starts speech at once and never stops it; counts detectors made and not closed."""
    open = 0

    def __init__(self):
        CountedDetector.open += 1
        self.closed = False

    def push(self, x):
        from omni2.streaming.listening.vad import VadEvent

        return [VadEvent("speech_started", 0)]

    def close(self):
        assert not self.closed, "closed twice"
        self.closed = True
        CountedDetector.open -= 1


def test_every_detector_the_input_replaces_is_closed():
    """session.update, a manual commit mid-speech, a stall, the turn limit and the session's
    end each replace or drop the detector: each old one goes back (its module to the pool)."""
    from omni2.server.input_audio import InputAudio
    from omni2.server.session_config import TurnDetection
    from omni2.streaming.audio import AudioFormat

    CountedDetector.open = 0
    second = 16000 * 2 * b"\0"  # 1 s of pcm16 at 16 kHz
    audio = InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), max_turn_s=2.0, idle_keep_s=0.5,
                       detector_factory=lambda td: CountedDetector())
    audio.configure(AudioFormat("pcm16", 16000), TurnDetection(silence_duration_ms=700))
    audio.push(second)
    assert audio.in_speech
    audio.commit()                      # manual commit mid-speech: a fresh detector
    audio.push(second)
    audio.end_speech()                  # the stall timeout: a fresh detector
    for _ in range(4):
        audio.push(second)              # past max_turn_s: forced stop, a fresh detector
    assert CountedDetector.open == 1
    audio.close()
    assert CountedDetector.open == 0
