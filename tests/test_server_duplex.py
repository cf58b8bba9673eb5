"""Duplex listening in the server: a spoken command or a barge-in stops the answer.

Real DuplexController (silero VAD, echo canceller, whisper tiny.en command detector) behind
the socket; the fake engine speaks a long answer in real time while the client's microphone
streams at real time too, with espeak-ng speech dropped in.
"""
from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, pcm16_b64, running_server, types  # noqa: E402
from speech import requires_speech, resample, silence, speak  # noqa: E402

CHUNK_S = 0.04


def recognizer_or_skip():
    from omni2.streaming.listening.interrupt import RecognizerUnavailable, shared_recognizer

    try:
        shared_recognizer()
    except RecognizerUnavailable as exc:
        pytest.skip(f"command recognizer unavailable: {exc}")


async def talk_over_the_answer(url: str, words: str, after_s: float = 0.6, tail_s: float = 2.0,
                               voice: str = "en-us", speed: int = 160) -> list[dict]:
    """Ask for a long answer, then let the microphone carry `words` while it plays."""
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    await c.send_text("a long story")
    await c.send("response.create")
    mic = np.concatenate([silence(after_s), speak(words, voice=voice, speed=speed), silence(tail_s)])
    mic24 = resample(mic, 16000, 24000)
    n = int(24000 * CHUNK_S)
    events: list[dict] = []
    reader = asyncio.create_task(_collect(c, events))
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k, i in enumerate(range(0, mic24.size, n)):
        await asyncio.sleep(max(0.0, start + k * CHUNK_S - loop.time()))
        await c.send("input_audio_buffer.append", audio=pcm16_b64(mic24[i:i + n]))
    await asyncio.sleep(0.5)
    reader.cancel()
    await c.close()
    return events


async def _collect(c: Client, events: list[dict]) -> None:
    while True:
        events.append(await c.recv(60))


@pytest.fixture
def engine():
    eng = FakeEngine(slots=2, answer_words=300).start()  # a 30 s answer, spoken in real time
    yield eng
    eng.stop()


def check_command_stop(events: list[dict]) -> None:
    """Cancelled once, speech_started first (clients flush their player), no audio after
    response.done, and the command is not answered."""
    t = types(events)
    assert t.count("response.done") == 1, t
    done_at = t.index("response.done")
    assert events[done_at]["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    started = t.index("input_audio_buffer.speech_started")
    assert started < done_at and started < t.index("input_audio_buffer.speech_stopped"), t
    assert "response.output_audio.delta" not in t[done_at:], t[done_at:]
    assert t.count("response.created") == 1 and "input_audio_buffer.committed" not in t, t


@requires_speech
def test_command_mode_stop_omni_stops_the_answer_and_is_not_a_question(engine):
    recognizer_or_skip()
    with running_server(engine, interrupt_mode="command") as srv:
        events = asyncio.run(asyncio.wait_for(talk_over_the_answer(srv.ws, "stop omni"), 60))
        with urllib.request.urlopen(srv.http + "/metrics") as r:
            metrics = r.read().decode()
    check_command_stop(events)
    assert 'omni2_interrupts_total{kind="command"} 1' in metrics


@requires_speech
@pytest.mark.parametrize("voice,speed", [("en-us", 150), ("en-gb-x-rp", 190)])
def test_stop_omni_stops_a_tiny_model_answer(voice, speed):
    """The real engine (tiny model) streams the answer; two voices say the command over it."""
    recognizer_or_skip()
    from server_harness import tiny_engine

    with tiny_engine(max_sessions=2) as eng, running_server(eng, interrupt_mode="command", max_steps=1024) as srv:
        events = asyncio.run(asyncio.wait_for(
            talk_over_the_answer(srv.ws, "stop omni", voice=voice, speed=speed), 90))
    check_command_stop(events)


@requires_speech
def test_command_mode_ignores_other_talk_over_the_answer(engine):
    recognizer_or_skip()
    with running_server(engine, interrupt_mode="command") as srv:
        events = asyncio.run(asyncio.wait_for(
            talk_over_the_answer(srv.ws, "what is the weather like tomorrow"), 60))
    t = types(events)
    assert "response.done" not in t and "input_audio_buffer.speech_started" not in t, t
    assert t.count("response.output_audio.delta") > 20  # the answer kept playing


@requires_speech
def test_barge_in_mode_cancels_and_answers_the_new_question(engine):
    with running_server(engine, interrupt_mode="barge_in") as srv:
        async def main():
            events = await talk_over_the_answer(srv.ws, "what is the weather like tomorrow", tail_s=3.5)
            return events

        events = asyncio.run(asyncio.wait_for(main(), 60))
    t = types(events)
    first_done = t.index("response.done")
    assert events[first_done]["response"]["status_details"]["reason"] == "turn_detected"
    started = t.index("input_audio_buffer.speech_started")
    assert started < t.index("input_audio_buffer.speech_stopped") < t.index("response.created", started)
    assert t.count("response.created") == 2, t


# ---- the answer is fully generated, still playing ------------------------------------------------
@pytest.fixture
def fast_engine():
    """Writes an 8 s answer in ~1.6 s: the user speaks while it plays, after it was generated.
    Unpaced (output_lead_s=0) its response.done has gone out by then, as happens for the last
    output_lead_s of every paced answer; paced, the answer is still live (see the paced test)."""
    eng = FakeEngine(slots=2, answer_words=80, words_every=1, tick_s=0.02, chunk_s=0.1).start()
    yield eng
    eng.stop()


def check_playback_stop(events: list[dict], engine: FakeEngine) -> dict:
    """The answer was complete before the user spoke; then the client is told to flush
    (speech_started), the item is truncated to what had played, and the model forgets the rest."""
    t = types(events)
    done_at = t.index("response.done")
    assert events[done_at]["response"]["status"] == "completed", events[done_at]
    started = t.index("input_audio_buffer.speech_started")
    assert done_at < started < t.index("conversation.item.truncated"), t
    truncated = events[t.index("conversation.item.truncated")]
    audio_ms = sum(len(e["delta"]) for e in events if e["type"] == "response.output_audio.delta") * 3 // 4 // 48
    assert truncated["item_id"] == events[done_at]["response"]["output"][0]["id"]
    assert 1500 <= truncated["audio_end_ms"] < audio_ms - 1000, (truncated, audio_ms)  # what had played
    from omni2.model.snac_layout import steps_heard

    assert [steps for _, _, steps in engine.truncations] == [steps_heard(truncated["audio_end_ms"] * 24)]
    return truncated


@requires_speech
def test_stop_omni_while_a_generated_answer_still_plays_stops_it(fast_engine):
    recognizer_or_skip()
    with running_server(fast_engine, interrupt_mode="command", output_lead_s=0) as srv:
        events = asyncio.run(asyncio.wait_for(talk_over_the_answer(srv.ws, "stop omni", after_s=2.5), 60))
    check_playback_stop(events, fast_engine)
    t = types(events)
    assert t.index("conversation.item.truncated") < t.index("input_audio_buffer.speech_stopped"), t
    assert t.count("response.created") == 1 and "input_audio_buffer.committed" not in t, t  # not a question


@requires_speech
def test_stop_omni_while_a_paced_answer_is_still_being_sent_drops_the_rest(fast_engine):
    """Paced (1 s lead), the generated answer is still live while it plays: the command cancels
    it, the item is cut to what had played, and the audio never sent never reaches the client."""
    recognizer_or_skip()
    with running_server(fast_engine, interrupt_mode="command", output_lead_s=1.0) as srv:
        events = asyncio.run(asyncio.wait_for(talk_over_the_answer(srv.ws, "stop omni", after_s=2.5), 60))
    t = types(events)
    done = events[t.index("response.done")]
    assert done["response"]["status_details"]["reason"] == "turn_detected", done
    assert t.index("input_audio_buffer.speech_started") < t.index("response.done") < t.index(
        "conversation.item.truncated"), t
    audio_ms = sum(len(e["delta"]) for e in events if e["type"] == "response.output_audio.delta") * 3 // 4 // 48
    truncated = events[t.index("conversation.item.truncated")]
    assert 1500 <= truncated["audio_end_ms"] <= audio_ms < 8000 - 2000, (truncated, audio_ms)
    assert audio_ms - truncated["audio_end_ms"] <= 1000 + 400, (truncated, audio_ms)  # at most the lead unheard


@requires_speech
def test_other_talk_while_a_generated_answer_plays_is_ignored_in_command_mode(fast_engine):
    recognizer_or_skip()
    with running_server(fast_engine, interrupt_mode="command") as srv:
        events = asyncio.run(asyncio.wait_for(
            talk_over_the_answer(srv.ws, "what is the weather like tomorrow", after_s=2.5), 60))
    t = types(events)
    assert "input_audio_buffer.speech_started" not in t and "conversation.item.truncated" not in t, t
    assert not fast_engine.truncations


@requires_speech
def test_barge_in_while_a_generated_answer_plays_stops_it_and_answers(fast_engine):
    with running_server(fast_engine, interrupt_mode="barge_in", output_lead_s=0) as srv:
        events = asyncio.run(asyncio.wait_for(
            talk_over_the_answer(srv.ws, "what is the weather like tomorrow", after_s=2.5, tail_s=3.0), 60))
    check_playback_stop(events, fast_engine)
    t = types(events)
    assert t.count("response.created") == 2 and "input_audio_buffer.committed" in t, t  # the new question
