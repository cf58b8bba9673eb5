"""Input audio transcription with the offline recognizer (whisper tiny.en, CTranslate2), over
a real socket: off by default, on when audio.input.transcription asks, for VAD turns and
manual commits; the transcript lands in the item (conversation.item.retrieve) and every event
is a GA event."""
from __future__ import annotations

import pytest

pytest.importorskip("faster_whisper", reason="faster-whisper is not installed")
pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, fake_engine_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402
from test_server_ga_events import assert_ga, run  # noqa: E402

ASK = {"model": "gpt-4o-mini-transcribe", "language": "en"}
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture(scope="module")
def server():
    with fake_engine_server(answer_words=4) as (_, srv):
        yield srv


@pytest.fixture(scope="module")
def speech_24k():
    audio, _, _ = utterance("what is the weather like today", lead_s=0.4, tail_s=1.2)
    return resample(audio, 16000, 24000)


async def session(server, transcription, turn_detection) -> Client:
    c = await Client.connect(server.ws)
    await c.recv()
    await c.send("session.update", session={"type": "realtime", "audio": {"input": {
        "transcription": transcription, "turn_detection": turn_detection}}})
    await c.until("session.updated")
    return c


@requires_speech
def test_a_spoken_turn_is_transcribed_when_asked(server, speech_24k):
    async def main():
        c = await session(server, ASK, {"type": "server_vad"})
        updated = c.seen[-1]
        await stream_audio(c, speech_24k)
        events = await c.until(COMPLETED)
        events += [] if "response.done" in types(events) else await c.until("response.done")
        item_id = events[types(events).index(COMPLETED)]["item_id"]
        await c.send("conversation.item.retrieve", item_id=item_id)
        item = (await c.until("conversation.item.retrieved"))[-1]["item"]
        await c.close()
        return updated, events, item

    updated, events, item = run(main())
    assert updated["session"]["audio"]["input"]["transcription"] == ASK
    assert any("offline recognizer" in note for note in updated["notes"])
    completed = events[types(events).index(COMPLETED)]
    deltas = [e["delta"] for e in events if e["type"] == DELTA]
    assert "weather" in completed["transcript"].lower(), completed
    assert "".join(deltas).strip() == completed["transcript"] and completed["content_index"] == 0
    assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 1.0
    committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
    assert completed["item_id"] == committed["item_id"]
    assert item["content"] == [{"type": "input_audio", "transcript": completed["transcript"]}]
    assert_ga(events + [updated])


@requires_speech
def test_manual_commits_are_transcribed_and_nothing_is_by_default(server, speech_24k):
    async def main():
        on = await session(server, {"model": "whisper-1"}, None)
        await stream_audio(on, speech_24k)
        await on.send("input_audio_buffer.commit")
        got = await on.until(COMPLETED)
        await on.close()
        off = await session(server, None, None)
        await stream_audio(off, speech_24k)
        await off.send("input_audio_buffer.commit")
        await off.send("response.create")
        quiet = await off.until("response.done")
        await off.close()
        return got[-1], quiet

    completed, quiet = run(main())
    assert "weather" in completed["transcript"].lower()
    assert not [t for t in types(quiet) if "transcription" in t]
