"""Many sessions at once: each spoken question gets its own answer, nothing crosses over."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server, spoken_questions, stream_audio, types  # noqa: E402
from speech import requires_speech  # noqa: E402

QUESTIONS = ["what is this", "tell me about the weather", "where are we", "who is that",
             "read the sign please", "how many cups are there", "is it raining", "what colour is the car"]


@pytest.fixture(scope="module")
def spoken():
    return spoken_questions(QUESTIONS, lead_s=0.3)


async def one_session(url: str, index: int, audio) -> dict:
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    # A typed tag in the same turn lets us check whose answer came back.
    await c.send_text(f"client{index}")
    await stream_audio(c, audio, pace=0.5)
    events = await c.until("response.done", timeout=60)
    await c.close()
    t = types(events)
    assert t.index("input_audio_buffer.speech_stopped") < t.index("response.created")
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    audio_deltas = sum(1 for e in events if e["type"] == "response.output_audio.delta")
    return {"status": events[-1]["response"]["status"], "transcript": transcript, "deltas": audio_deltas}


@requires_speech
@pytest.mark.parametrize("sessions", [2, 8])
def test_concurrent_sessions_each_get_their_own_answer(sessions, spoken):
    engine = FakeEngine(slots=sessions).start()
    try:
        with running_server(engine, max_sessions=sessions) as srv:
            async def main():
                return await asyncio.gather(*(one_session(srv.ws, i, spoken[i]) for i in range(sessions)))

            results = asyncio.run(asyncio.wait_for(main(), 120))
            assert engine.stats()["live_turns"] == 0
    finally:
        engine.stop()
    owners = set()
    for i, r in enumerate(results):
        assert r["status"] == "completed" and r["deltas"] > 0, r
        assert f"text=client{i}" in r["transcript"], (i, r["transcript"])
        assert "s-audio" in r["transcript"]
        owners.add(r["transcript"].split()[0])  # the engine session that answered
    assert len(owners) == sessions
