"""semantic_vad (eagerness picks the silence window) and idle_timeout_ms
(input_audio_buffer.timeout_triggered), over a real socket with the real VAD and espeak speech."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, fake_engine_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402
from test_server_ga_events import assert_ga, run  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with fake_engine_server(answer_words=4) as (_, srv):
        yield srv


async def configured(server, turn_detection: dict) -> tuple[Client, dict]:
    c = await Client.connect(server.ws)
    await c.recv()
    await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}})
    got = await c.until("session.updated")
    assert types(got) == ["session.updated"], got
    return c, got[-1]


@requires_speech
def test_semantic_vad_eagerness_sets_how_long_the_silence_that_ends_a_turn_is(server):
    audio, _, end = utterance("what is the weather like today", lead_s=0.4, tail_s=2.0)

    async def turn(eagerness: str):
        c, updated = await configured(server, {"type": "semantic_vad", "eagerness": eagerness})
        await stream_audio(c, resample(audio, 16000, 24000))
        events = await c.until("response.done")
        await c.close()
        return updated, events

    async def main():
        return await turn("high"), await turn("low")

    (high_updated, high), (low_updated, low) = run(main())
    td = high_updated["session"]["audio"]["input"]["turn_detection"]
    assert td == {"type": "semantic_vad", "eagerness": "high", "create_response": True, "interrupt_response": True}
    assert any("300 ms of silence" in n for n in high_updated["notes"])
    gaps = []
    for events in (high, low):
        assert "error" not in types(events)
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        gaps.append(stopped["audio_end_ms"] - end * 1000 // 16000)
    assert gaps[1] - gaps[0] > 400, gaps   # low waits 1000 ms of silence, high 300 ms
    assert_ga([high_updated, low_updated] + high + low)


def test_idle_timeout_prompts_after_a_quiet_spell(server):
    async def main():
        c, updated = await configured(server, {"type": "server_vad", "idle_timeout_ms": 1000})
        await stream_audio(c, np.zeros(int(24000 * 1.6), np.float32))
        events = await c.until("response.done")
        await c.close()
        return updated, events

    updated, events = run(main())
    assert updated["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 1000
    t = types(events)
    assert t[:4] == ["input_audio_buffer.timeout_triggered", "input_audio_buffer.committed",
                     "conversation.item.added", "conversation.item.done"], t
    fired = events[0]
    assert 950 <= fired["audio_end_ms"] - fired["audio_start_ms"] <= 1200, fired
    assert events[1]["item_id"] == fired["item_id"] and events[-1]["response"]["status"] == "completed"
    assert_ga([updated] + events)
