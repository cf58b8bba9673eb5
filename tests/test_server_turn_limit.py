"""A turn as long as the input buffer allows (`max_turn_audio_s`) is committed and answered.

The buffer keeps at most `max_turn_audio_s`; what a commit takes from it can be a little more
(the 24 kHz resampler's held-back tail, or the last append past the limit when server VAD
forces the commit). That turn used to be refused as "committed audio waiting for a response
exceeds the limit" and lost: a manual commit of a full buffer emptied it and answered nothing,
and a VAD turn that reached the limit sent speech_stopped, an error, and no turn. Real uvicorn
on loopback, websockets client, null engine, real silero VAD for the VAD case.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402

LIMIT_S = 1.0


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(slots=2).start()
    with running_server(eng, max_turn_audio_s=LIMIT_S) as srv:
        yield eng, srv
    eng.stop()


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def manual_session(srv) -> Client:
    """A session with turn detection off and short answers."""
    c = await Client.connect(srv.ws)
    await c.until("session.created")
    await c.send("session.update", session={"type": "realtime", "max_output_tokens": 5,
                                            "audio": {"input": {"turn_detection": None}}})
    await c.until("session.updated")
    return c


def test_manual_commit_of_a_full_buffer_is_answered(server):
    eng, srv = server

    async def main():
        c = await manual_session(srv)
        await stream_audio(c, tone(1.5), chunk_s=0.25)   # 0.5 s past the limit: refused
        await c.send("input_audio_buffer.commit")
        got = await c.until("input_audio_buffer.committed")
        await c.send("response.create")
        got += await c.until("response.done")
        await c.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    errors = [e["error"] for e in got if e["type"] == "error"]
    assert errors and all(e["code"] == "input_audio_buffer_full" and "dropped" in e["message"]
                          for e in errors), errors
    assert "conversation.item.added" in types(got)
    audio = eng.submitted[-1].audio_16k
    assert audio.size >= int(16000 * LIMIT_S) * 0.98, audio.size   # the whole buffer became the turn


@requires_speech
def test_vad_turn_that_reaches_the_limit_is_committed_and_answered(server):
    eng, srv = server
    speech, _, _ = utterance("the quick brown fox jumps over the lazy dog and runs on", lead_s=0.3, tail_s=0.2)
    speech = resample(speech, 16000, 24000)
    assert speech.size > 24000 * (LIMIT_S + 0.8)

    async def main():
        c = await Client.connect(srv.ws)
        await c.until("session.created")
        await c.send("session.update", session={"type": "realtime", "max_output_tokens": 5})
        await c.until("session.updated")
        await stream_audio(c, speech, chunk_s=0.3)
        got = await c.until("response.done")
        await c.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    t = types(got)
    assert "error" not in t, [e for e in got if e["type"] == "error"]
    stopped = t.index("input_audio_buffer.speech_stopped")
    assert t[stopped + 1] == "input_audio_buffer.committed", t
    assert "response.created" in t


def test_committed_audio_piling_up_unanswered_is_refused_and_stays_buffered(server):
    eng, srv = server

    async def main():
        c = await manual_session(srv)
        await stream_audio(c, tone(0.7))
        await c.send("input_audio_buffer.commit")
        got = await c.until("input_audio_buffer.committed")
        await stream_audio(c, tone(0.7))
        await c.send("input_audio_buffer.commit")   # 1.4 s would wait unanswered: refused
        got += await c.until("error")
        await c.send("response.create")
        got += await c.until("response.done")
        await c.send("input_audio_buffer.commit")   # the refused audio is still there
        got += await c.until("input_audio_buffer.committed")
        await c.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    errors = [e["error"] for e in got if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "input_audio_buffer_full", errors
    assert "send response.create" in errors[0]["message"]
    assert types(got).count("input_audio_buffer.committed") == 2
