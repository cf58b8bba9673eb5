"""Work during the closing silence: a VAD turn's question is encoded and prefilled while
the server still waits for silence_duration_ms, and the answer is the same as without.

Fake-engine tests look at what reached the engine (held request, release, discard); the
tiny-engine test checks the answer on the wire is byte-identical with speculation on or off;
the context test fills a small context window and expects the items it forgot to be named.
"""
from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server, stream_audio, tiny_engine, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402
from test_engine import wait_for  # noqa: E402
from test_server_session import check_response  # noqa: E402

from omni2.streaming.listening.vad import CHUNK  # noqa: E402

VAD = {"type": "realtime", "audio": {"input": {"turn_detection": {
    "type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 300}}}}
TAIL_MS = 200


def quiet_samples(ms: int) -> int:
    """Quiet the VAD needs to count `ms`: whole 32 ms chunks."""
    return -(-ms * 16 // CHUNK) * CHUNK


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def metrics(srv) -> str:
    with urllib.request.urlopen(srv.http + "/metrics") as r:
        return r.read().decode()


async def spoken_turn(srv, audio_24k: np.ndarray) -> list[dict]:
    c = await Client.connect(srv.ws)
    assert (await c.recv())["type"] == "session.created"
    await c.send("session.update", session=VAD)
    await c.until("session.updated")
    await stream_audio(c, audio_24k, pace=0.5)
    events = await c.until("response.done", timeout=90)
    await c.close()
    return events


@pytest.fixture(scope="module")
def one_question():
    audio, _, _ = utterance("what do you see in this picture", lead_s=0.5, tail_s=1.2)
    return resample(audio, 16000, 24000)


@pytest.fixture(scope="module")
def two_phrases():
    """One question said in two parts with a 450 ms gap: a pause, not the end of the turn."""
    first, _, _ = utterance("what is the weather", lead_s=0.5, tail_s=0.45)
    second, _, _ = utterance("in paris today", lead_s=0.0, tail_s=1.2)
    return resample(np.concatenate([first, second]), 16000, 24000)


@requires_speech
@pytest.mark.parametrize("speculate", [True, False])
def test_the_engine_gets_the_same_question_with_or_without_speculation(one_question, speculate):
    """The turn's audio ends TAIL_MS into the closing quiet either way; with speculation
    that exact question was submitted held before speech_stopped and then released."""
    engine = FakeEngine(slots=2).start()
    try:
        with running_server(engine, speculative_turns=speculate, turn_audio_tail_ms=TAIL_MS) as srv:
            events = run(spoken_turn(srv, one_question))
            t = types(events)
            started, stopped = events[t.index("input_audio_buffer.speech_started")], \
                events[t.index("input_audio_buffer.speech_stopped")]
            r = check_response(events[t.index("response.created"):])
            assert t.count("response.created") == 1
            (request,) = engine.submitted  # one request reached the engine, used as it was
            assert request.hold == speculate
            # stop - cut = the rest of silence_duration_ms, in whole VAD chunks
            turn_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
            cut_ms = (quiet_samples(500) - quiet_samples(TAIL_MS)) * 1000 / 16000
            assert abs(request.audio_16k.size / 16 - (turn_ms - cut_ms)) <= 2, (request.audio_16k.size, turn_ms)
            assert f"{request.audio_16k.size / 16000:.1f}s-audio" in r["transcript"]
            text = metrics(srv)
            used = 'omni2_speculative_turns_total{outcome="used"} 1'
            assert (used in text) == speculate, text
    finally:
        engine.stop()


@requires_speech
def test_a_pause_inside_the_question_discards_the_speculation(two_phrases):
    """Speech after a pause voids the held question; the answer is to the whole question,
    and the discarded speculation never shows on the wire."""
    engine = FakeEngine(slots=2).start()
    try:
        with running_server(engine, turn_audio_tail_ms=TAIL_MS) as srv:
            events = run(spoken_turn(srv, two_phrases))
            t = types(events)
            assert t.count("input_audio_buffer.speech_started") == 1 and t.count("response.created") == 1, t
            r = check_response(events[t.index("response.created"):])
            first, last = engine.submitted[0], engine.submitted[-1]
            assert len(engine.submitted) == 2 and first.hold and last.hold
            assert first.audio_16k.size < last.audio_16k.size
            assert np.array_equal(last.audio_16k[: first.audio_16k.size], first.audio_16k)
            assert f"{last.audio_16k.size / 16000:.1f}s-audio" in r["transcript"]
            text = metrics(srv)
            assert 'omni2_speculative_turns_total{outcome="discarded"} 1' in text
            assert 'omni2_speculative_turns_total{outcome="used"} 1' in text
            assert engine.cancels_total == 1
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def real_engine():
    with tiny_engine(max_sessions=2) as eng:
        yield eng


@requires_speech
def test_tiny_engine_answers_the_same_with_speculation(real_engine, one_question):
    """Same tokens, so the same transcript and the same speech. The PCM may differ by one
    least significant bit here and there: the vocoder decodes whatever frames wait when it
    wakes (a timing matter), and windows of other lengths round SNAC's float output
    differently in the last bits (streaming == one-shot holds within 1e-3, not bitwise)."""
    answers = {}
    for speculate in (True, False):
        # Both answers from slot 0: which rows a turn decodes in may move fp32 results by an
        # ulp (another GEMM shape), so wait until the last run's session has let go of its slot.
        wait_for(lambda: real_engine.stats()["free_slots"] == len(real_engine.slots), timeout=10)
        with running_server(real_engine, speculative_turns=speculate, max_steps=32) as srv:
            events = run(spoken_turn(srv, one_question))
        t = types(events)
        answers[speculate] = check_response(events[t.index("response.created"):], status=None)
    on, off = answers[True], answers[False]
    pcm_on, pcm_off = (np.frombuffer(a["audio"], dtype="<i2").astype(np.int32) for a in (on, off))
    assert len(pcm_on) > 0 and len(pcm_on) == len(pcm_off)
    assert np.abs(pcm_on - pcm_off).max() <= 1
    assert on["transcript"] == off["transcript"]
    assert on["done"]["status"] == off["done"]["status"]


def test_a_full_context_window_names_the_items_it_forgot():
    """Three typed turns in a 90-position window: the third pushes the first out, and the
    client hears which items (the first question and its answer) the model no longer sees."""
    async def main(srv):
        c = await Client.connect(srv.ws + "?omni2_extensions=1")  # the event is an extension
        assert (await c.recv())["type"] == "session.created"
        await c.send("session.update", session={"type": "realtime",
                                                "audio": {"input": {"turn_detection": None}}})
        await c.until("session.updated")
        turns = []
        for words in ("hello there", "how are you", "tell me more"):
            await c.send_text(words)
            user = (await c.until("conversation.item.done"))[-1]["item"]["id"]
            await c.send("response.create", response={"max_output_tokens": 24})
            events = await c.until("response.done", timeout=90)
            assistant = events[-1]["response"]["output"][0]["id"]
            turns.append((user, assistant, events))
        await c.close()
        return turns

    with tiny_engine(max_sessions=1, max_context=90) as eng, running_server(eng, max_steps=24) as srv:
        turns = run(main(srv))
        cut = [e for _, _, events in turns for e in events if e["type"] == "conversation.context.truncated"]
        assert len(cut) == 1, [types(ev) for _, _, ev in turns]
        assert cut[0]["item_ids"] == [turns[0][0], turns[0][1]] and cut[0]["dropped_positions"] > 0
        assert [e for e in turns[2][2] if e["type"] == "conversation.context.truncated"] == cut
        assert "omni2_context_truncations_total 1" in metrics(srv)


@requires_speech
def test_leaving_during_the_closing_silence_frees_the_held_question():
    """The client goes away after the pause but before speech_stopped: the held question is
    cancelled with the session, nothing stays live in the engine."""
    import time

    audio, _, end = utterance("what do you see in this picture", lead_s=0.5, tail_s=0.35)
    engine = FakeEngine(slots=2).start()
    try:
        with running_server(engine, turn_audio_tail_ms=TAIL_MS) as srv:
            async def main():
                c = await Client.connect(srv.ws)
                assert (await c.recv())["type"] == "session.created"
                await c.send("session.update", session=VAD)
                await c.until("session.updated")
                await stream_audio(c, resample(audio, 16000, 24000))
                deadline = time.monotonic() + 10
                while not engine.submitted and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await c.close()
            run(main())
            (request,) = engine.submitted
            assert request.hold
            deadline = time.monotonic() + 10
            while engine.stats()["live_turns"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.stats()["live_turns"] == 0 and engine.cancels_total == 1
            assert 'omni2_speculative_turns_total{outcome="discarded"} 1' in metrics(srv)
    finally:
        engine.stop()
