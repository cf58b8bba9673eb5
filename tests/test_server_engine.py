"""The server on the real engine with the tiny model: the whole path, socket to SNAC audio.

The tiny model's words are noise, so answers are checked for shape and consistency (event
order, valid PCM, transcript deltas adding up to the engine's text, usage, slots freed),
and concurrent sessions against the same questions answered one at a time (greedy decoding
is deterministic, so batching must not change anyone's answer).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, jpeg_data_url, running_server, spoken_questions, stream_audio, tiny_engine, types  # noqa: E402
from speech import requires_speech  # noqa: E402
from test_server_session import check_response  # noqa: E402

MAX_STEPS = 48
QUESTIONS = ["what is this", "tell me about the weather", "where are we", "who is that",
             "read the sign please", "how many cups", "is it raining", "what colour is the car"]


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(max_sessions=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, max_sessions=8, max_steps=MAX_STEPS) as srv:
        yield srv


@pytest.fixture(scope="module")
def spoken():
    return spoken_questions(QUESTIONS, lead_s=0.4)


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def summary(events: list[dict]) -> dict:
    """check_response's order/id/transcript checks, whatever the final status."""
    return check_response(events, status=None)


async def spoken_turn(url: str, audio: np.ndarray, image: str | None = None, pace: float = 0.0) -> dict:
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    if image:
        await c.send("input_image_buffer.append", image=image)
    await stream_audio(c, audio, pace=pace)
    events = await c.until("response.done", timeout=90)
    await c.close()
    return summary(events)


@requires_speech
def test_spoken_question_with_image_end_to_end(server, spoken):
    async def main():
        c = await Client.connect(server.ws)
        assert (await c.recv())["type"] == "session.created"
        await c.send("session.update", session={"type": "realtime", "audio": {
            "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        await c.until("session.updated")
        await c.send("input_image_buffer.append", image=jpeg_data_url())
        await stream_audio(c, spoken[0])
        events = await c.until("response.done", timeout=90)
        t = types(events)
        assert t[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"], t
        with_image = summary(events)
        # Same question again, no picture this time: the prompt is shorter by the image tokens.
        await stream_audio(c, spoken[0])
        without = summary(await c.until("response.done", timeout=90))
        await c.close()
        return with_image, without

    with_image, without = run(main())
    for r in (with_image, without):
        assert r["status"] in ("completed", "incomplete"), r["done"]
        # (check_response asserts the deltas add up to the engine's final text)
        assert len(r["audio"]) % 2 == 0 and len(r["audio"]) > 0
        pcm = np.frombuffer(r["audio"], dtype="<i2")
        assert np.abs(pcm).max() > 0
        assert r["usage"]["output_token_details"]["text_tokens"] <= MAX_STEPS
    assert with_image["usage"]["input_tokens"] > without["usage"]["input_tokens"]


@requires_speech
@pytest.mark.parametrize("sessions", [2, 8])
def test_concurrent_sessions_get_the_answers_they_get_alone(server, spoken, sessions):
    async def alone():
        return [await spoken_turn(server.ws, spoken[i]) for i in range(sessions)]

    async def together():
        return await asyncio.gather(*(spoken_turn(server.ws, spoken[i], pace=0.3) for i in range(sessions)))

    solo = run(alone())
    batched = run(together())
    for i, (a, b) in enumerate(zip(solo, batched)):
        assert b["status"] == a["status"] and len(b["audio"]) > 0, (i, b["done"])
        assert b["transcript"] == a["transcript"], (i, a["transcript"], b["transcript"])
        assert b["usage"] == a["usage"], i


def test_turn_through_the_openai_sdk(server):
    """The SDK turn of test_server_sdk (committed audio + a text item), on the real engine."""
    pytest.importorskip("openai")
    from test_server_sdk import sdk_turn

    seen = run(sdk_turn(server.port, "x"))
    assert not [e for e in seen if e.type == "error"]
    assert seen[-1].response.status in ("completed", "incomplete")
    assert any(e.type == "response.output_audio.delta" for e in seen)


@requires_speech
def test_cancel_and_disconnect_free_the_slot(engine, spoken):
    with running_server(engine, max_sessions=8, max_steps=1024) as srv:
        async def main():
            c = await Client.connect(srv.ws)
            await c.recv()
            await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
            await c.send_text("talk")
            await c.send("response.create")
            await c.until("response.output_audio.delta", timeout=60)
            await c.send("response.cancel")
            done = (await c.until("response.done", timeout=30))[-1]["response"]
            assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            await c.send_text("again")
            await c.send("response.create")
            await c.until("response.output_audio.delta", timeout=60)
            assert engine.stats()["live_turns"] == 1
            c.conn.transport.abort()  # vanish mid-answer

        before = engine.stats()["cancels_total"]
        run(main())
        deadline = time.time() + 10
        while time.time() < deadline:
            s = engine.stats()
            if s["live_turns"] == 0 and s["sessions"] == 0:
                break
            time.sleep(0.05)
        s = engine.stats()
        assert (s["live_turns"], s["sessions"], s["free_slots"]) == (0, 0, 8), s
        assert s["cancels_total"] >= before + 2


def test_typed_question_with_camera_on_is_answered_and_keeps_the_frame(server):
    """Mini-Omni2 pairs images with speech only: a typed turn while the camera streams is
    answered from the text, and an explicit image with only text is a clear error."""
    async def main():
        c = await Client.connect(server.ws)
        assert (await c.recv())["type"] == "session.created"
        await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await c.until("session.updated")
        await c.send("input_image_buffer.append", image=jpeg_data_url())
        await c.send_text("hello")
        await c.send("response.create")
        typed = await c.until("response.done", timeout=90)
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "what is this"}, {"type": "input_image", "image_url": jpeg_data_url()}]})
        await c.send("response.create", event_id="evt_img")
        err = await c.until("error", timeout=30)
        await c.close()
        return typed, err

    typed, err = run(main())
    assert typed[-1]["response"]["status"] in ("completed", "incomplete"), typed[-1]
    assert err[-1]["error"]["code"] == "invalid_input" and err[-1]["error"]["event_id"] == "evt_img"


def test_a_truncated_answer_leaves_the_models_context_at_what_was_heard(engine, server):
    """conversation.item.truncate after the answer: the session's context ends after the steps
    whose speech played (snac_layout.steps_heard), and the next question goes right there."""
    from omni2.model.snac_layout import steps_heard

    async def main():
        c = await Client.connect(server.ws)
        await c.recv()
        await c.send_text("tell me a story")
        await c.send("response.create")
        events = await c.until("response.done")
        done = events[-1]
        slot = next(s for s in engine.slots if s.session is not None)
        full = slot.ctx
        item = done["response"]["output"][0]["id"]
        audio_ms = sum(len(e["delta"]) for e in events if e["type"] == "response.output_audio.delta") * 3 // 4 // 48
        await c.send("conversation.item.truncate", item_id=item, content_index=0, audio_end_ms=audio_ms - 20)
        await c.until("conversation.item.truncated")
        await asyncio.sleep(0.3)
        assert slot.ctx == full  # heard to (nearly) the end: all of it stays
        await c.send("conversation.item.truncate", item_id=item, content_index=0, audio_end_ms=1000)
        truncated = (await c.until("conversation.item.truncated"))[-1]
        deadline = time.monotonic() + 10
        while slot.ctx == full and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert truncated["audio_end_ms"] == 1000
        answer = slot.records[-1]
        assert slot.ctx == answer.start + answer.prompt_len + steps_heard(24000) < full
        assert len(answer.fed) == steps_heard(24000)
        kept = slot.ctx
        await c.send_text("and then?")
        await c.send("response.create")
        await c.until("response.done")
        assert slot.turn_starts[-1] == kept  # the next question starts right after the heard part
        await c.close()

    run(main())
