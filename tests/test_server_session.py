"""Realtime sessions over a real socket (uvicorn on loopback, websockets client, fake engine).

Speech comes from espeak-ng and turn detection is the real silero-vad detector; the engine
is tests/fake_engine.py, whose answers name what each turn carried.
"""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Optional

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, jpeg_data_url, png_data_url, running_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402

from omni2.streaming.audio import mulaw_decode  # noqa: E402

OPENING = ["response.created", "response.output_item.added", "conversation.item.added",
           "response.content_part.added"]
CLOSING = ["response.output_audio.done", "response.output_audio_transcript.done",
           "response.content_part.done", "response.output_item.done", "conversation.item.done",
           "response.done"]
MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(slots=8).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, max_sessions=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def question():
    """A spoken question at 24 kHz with 0.5 s of silence before and 1.2 s after."""
    audio, start, end = utterance("what do you see in this picture", lead_s=0.5, tail_s=1.2)
    return resample(audio, 16000, 24000), start / 16000, end / 16000


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(server, **kw) -> Client:
    c = await Client.connect(server.ws, **kw)
    created = await c.recv()
    assert created["type"] == "session.created"
    return c


async def update(c: Client, session: dict) -> dict:
    await c.send("session.update", session=session)
    got = await c.until("session.updated")
    assert types(got) == ["session.updated"], got
    return got[-1]


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def check_response(events: list[dict], status: Optional[str] = "completed") -> dict:
    """Order, ids and content of one response's events (status checked unless None);
    returns a summary."""
    t = types(events)
    start = t.index("response.created")
    assert t[start:start + 4] == OPENING, t
    assert t[-6:] == CLOSING, t
    body = events[start + 4:-6]
    assert set(types(body)) <= {"response.output_audio.delta", "response.output_audio_transcript.delta"}, t
    rid = events[start]["response"]["id"]
    item_id = events[start + 1]["item"]["id"]
    for e in events[start + 1:]:
        if "response_id" in e:
            assert e["response_id"] == rid
        if "item_id" in e:
            assert e["item_id"] == item_id
    done = events[-1]["response"]
    assert status is None or done["status"] == status, done
    audio = b"".join(base64.b64decode(e["delta"]) for e in body if e["type"] == "response.output_audio.delta")
    transcript = "".join(e["delta"] for e in body if e["type"] == "response.output_audio_transcript.delta")
    assert events[-5]["transcript"] == transcript
    assert done["output"][0]["content"][0]["transcript"] == transcript
    return {"id": rid, "item_id": item_id, "audio": audio, "transcript": transcript, "done": done,
            "status": done["status"], "usage": done["usage"]}


@requires_speech
def test_scripted_conversation_with_speech_and_image(server, question):
    audio, speech_start, speech_end = question

    async def main():
        c = await connect(server, subprotocols=["realtime"])
        assert c.conn.subprotocol == "realtime"
        updated = await update(c, {"type": "realtime", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000},
                      "turn_detection": {"type": "server_vad", "silence_duration_ms": 500,
                                         "prefix_padding_ms": 300}},
            "output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
        assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
        await c.send("input_image_buffer.append", image=jpeg_data_url())
        await stream_audio(c, audio)
        events = await c.until("response.done")
        t = types(events)
        assert t[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"], t
        started, stopped, committed = events[:3]
        assert started["item_id"] == stopped["item_id"] == committed["item_id"] == events[3]["item"]["id"]
        assert events[3]["item"]["role"] == "user"
        # VAD timing: onset minus the prefix padding; end after the silence window.
        assert abs(started["audio_start_ms"] - (speech_start * 1000 - 300)) < 200, started
        assert abs(stopped["audio_end_ms"] - (speech_end * 1000 + 500)) < 250, stopped
        r = check_response(events)
        assert len(r["audio"]) % 2 == 0 and len(r["audio"]) > 0
        pcm = np.frombuffer(r["audio"], dtype="<i2").astype(np.float32) / 32768
        assert abs(dominant_hz(pcm, 24000) - 440) < 5  # the fake engine's tone, intact
        assert "image" in r["transcript"] and "s-audio" in r["transcript"], r["transcript"]
        assert r["done"]["usage"]["output_tokens"] > 0
        assert events[t.index("conversation.item.added", 5)]["previous_item_id"] == committed["item_id"]

        # Second turn in the same session, typed: the image was used once and is gone.
        await c.send_text("and now")
        await c.send("response.create")
        r2 = check_response(await c.until("response.done"))
        assert "text=and_now" in r2["transcript"] and "image" not in r2["transcript"]
        await c.close()

    run(main())


def test_manual_commit_and_response(server):
    async def main():
        c = await connect(server)
        await update(c, MANUAL)
        await c.send("input_audio_buffer.commit", event_id="c0")
        err = (await c.until("error"))[-1]["error"]
        assert (err["code"], err["event_id"]) == ("input_audio_buffer_commit_empty", "c0")
        tone = 0.2 * np.sin(2 * np.pi * 300 * np.arange(24000) / 24000)
        await stream_audio(c, tone)
        await c.send("input_audio_buffer.commit")
        got = await c.until("conversation.item.done")
        assert types(got) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        await c.send("response.create", response={"max_output_tokens": 6})
        r = check_response(await c.until("response.done"), status="incomplete")
        assert r["done"]["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
        assert "1.0s-audio" in r["transcript"]
        await c.send("input_audio_buffer.append", audio=base64.b64encode(b"\0\0" * 100).decode())
        await c.send("input_audio_buffer.clear")
        assert types(await c.until("input_audio_buffer.cleared")) == ["input_audio_buffer.cleared"]
        await c.close()

    run(main())


def test_response_cancel_stops_audio(server, engine):
    async def main():
        c = await connect(server)
        await update(c, MANUAL)
        await c.send_text("talk long")
        await c.send("response.create")
        await c.until("response.output_audio.delta")
        await c.send("response.create", event_id="dup")
        await c.send("response.cancel")
        got = await c.until("response.done")
        errors = [e["error"] for e in got if e["type"] == "error"]
        assert [(e["code"], e["event_id"]) for e in errors] == [("conversation_already_has_active_response", "dup")]
        done = got[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert done["output"][0]["status"] == "incomplete"
        await c.send("response.cancel", event_id="late")
        err = (await c.until("error"))[-1]["error"]
        assert (err["code"], err["event_id"]) == ("response_cancel_not_active", "late")
        await c.close()

    run(main())


@requires_speech
def test_speech_during_an_answer_interrupts_it(server, question, engine):
    audio, _, _ = question
    engine.answer_words = 60  # a long answer: the user talks over it

    async def main():
        c = await connect(server)
        await c.send_text("tell a story")
        await c.send("response.create")
        await c.until("response.output_audio.delta")
        await stream_audio(c, audio, pace=0.2)
        got = await c.until("response.done")
        assert "input_audio_buffer.speech_started" in types(got)
        first = got[-1]["response"]
        assert first["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        got = await c.until("response.done", timeout=30)
        assert "input_audio_buffer.speech_stopped" in types(got)
        assert got[-1]["response"]["status"] in ("completed", "cancelled")
        await c.close()

    try:
        run(main())
    finally:
        engine.answer_words = 8


def test_truncate_played_audio(server):
    async def main():
        c = await connect(server)
        await update(c, MANUAL)
        await c.send_text("hi")
        await c.send("response.create")
        r = check_response(await c.until("response.done"))
        ms = len(r["audio"]) // 2 * 1000 // 24000
        await c.send("conversation.item.truncate", item_id=r["item_id"], content_index=0, audio_end_ms=ms // 2)
        got = (await c.until("conversation.item.truncated"))[-1]
        assert (got["item_id"], got["audio_end_ms"]) == (r["item_id"], ms // 2)
        await c.send("conversation.item.truncate", item_id=r["item_id"], content_index=0, audio_end_ms=ms + 500)
        assert (await c.until("error"))[-1]["error"]["param"] == "audio_end_ms"
        await c.send("conversation.item.truncate", item_id="item_nope", content_index=0, audio_end_ms=1)
        assert (await c.until("error"))[-1]["error"]["code"] == "item_not_found"
        await c.close()

    run(main())


def test_g711_output_and_text_only_modality(server, engine):
    async def main():
        c = await connect(server)
        await update(c, {**MANUAL, "audio": {**MANUAL["audio"], "output": {"format": {"type": "audio/pcmu"}}}})
        await c.send_text("phone")
        await c.send("response.create")
        r = check_response(await c.until("response.done"))
        pcm = mulaw_decode(r["audio"])
        ticks = engine.words_every * (engine.answer_words + 1)  # the fake's answer length
        assert pcm.size == ticks * engine.tick_s * 8000
        assert abs(dominant_hz(pcm[400:], 8000) - 440) < 10

        await update(c, {"type": "realtime", "output_modalities": ["text"]})
        await c.send_text("quiet")
        await c.send("response.create")
        got = await c.until("response.done")
        t = types(got)
        assert "response.output_audio.delta" not in t and "response.output_text.delta" in t
        text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
        assert got[t.index("response.output_text.done")]["text"] == text and "text=quiet" in text
        await c.close()

    run(main())


def test_beta_clients_get_beta_event_names(server):
    async def main():
        c = await connect(server, headers={"OpenAI-Beta": "realtime=v1"})
        await update(c, {"turn_detection": None, "input_audio_format": "pcm16"})
        await c.send_text("old")
        await c.send("response.create")
        t = types(await c.until("response.done"))
        assert "response.audio.delta" in t and "response.audio_transcript.done" in t
        assert "conversation.item.created" in t and "response.output_audio.delta" not in t
        await c.close()

    run(main())


def corrupt_png_url() -> str:
    data = bytearray(base64.b64decode(png_data_url().split(",", 1)[1]))
    data[40:70] = b"\0" * 30
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


BAD_INPUTS = [
    ("{oops", "invalid_json", None),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 42, "event_id": "b1"}), "invalid_type", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "b2"}), "invalid_base64", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "b3"}), "invalid_audio", "audio"),
    (json.dumps({"type": "session.updatee", "event_id": "b4"}), "unknown_event_type", "type"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": "hi"}}}},
                 "event_id": "b5"}), "invalid_type", "session.audio.input.turn_detection.threshold"),
    (json.dumps({"type": "input_image_buffer.append", "image": corrupt_png_url(), "event_id": "b6"}),
     "invalid_image", "image"),
    (json.dumps({"type": "conversation.item.create", "event_id": "b7", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": corrupt_png_url()}]}}),
     "invalid_image", "item.content[0].image_url"),
    (json.dumps({"type": "input_image_buffer.append", "image": "data:image/png;base64,aGVsbG8=", "event_id": "b8"}),
     "invalid_image", "image"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (1536 << 10), "event_id": "b9"}),
     "message_too_large", None),
    (json.dumps({"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "b10"}),
     "item_not_found", "item_id"),
    (b"\x00\x01binary", "invalid_json", None),
]


def test_every_bad_input_gets_an_error_and_the_session_goes_on(server):
    async def main():
        c = await connect(server)
        await update(c, MANUAL)
        for raw, code, param in BAD_INPUTS:
            await c.send_raw(raw)
            got = await c.until("error")
            assert types(got) == ["error"], (code, got)
            err = got[-1]["error"]
            assert (err["code"], err["param"]) == (code, param), raw[:80]
            assert set(err) >= {"type", "code", "message", "param", "event_id"}
            if isinstance(raw, str) and '"event_id"' in raw and code != "message_too_large":
                assert err["event_id"] == json.loads(raw)["event_id"]
        # Still usable: a normal turn works.
        await c.send_text("still here")
        await c.send("response.create")
        assert "text=still_here" in check_response(await c.until("response.done"))["transcript"]
        await c.close()

    run(main())


def test_engine_full_is_an_error_not_a_crash():
    engine = FakeEngine(slots=1).start()
    try:
        with running_server(engine, max_sessions=2) as srv:
            async def main():
                a, b = await connect(srv), await connect(srv)
                for c in (a, b):
                    await update(c, MANUAL)
                    await c.send_text("x")
                await a.send("response.create")
                opening = await a.until("response.created")
                await b.send("response.create")
                err = (await b.until("error"))[-1]["error"]
                assert (err["type"], err["code"]) == ("server_error", "server_busy")
                check_response(opening[-1:] + await a.until("response.done"))
                await a.close()
                await b.close()

            run(main())
    finally:
        engine.stop()


@pytest.mark.parametrize("fmt,encode,rate", [
    ({"type": "audio/pcmu"}, "mulaw_encode", 8000),
    ({"type": "audio/pcma"}, "alaw_encode", 8000),
    ({"type": "audio/pcm", "rate": 16000}, "float_to_pcm16", 16000),
])
def test_input_formats_reach_the_engine_as_16k(server, engine, fmt, encode, rate):
    import omni2.streaming.audio as A

    async def main():
        c = await connect(server)
        await update(c, {"type": "realtime", "audio": {"input": {"format": fmt, "turn_detection": None}}})
        tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(1.5 * rate)) / rate)).astype(np.float32)
        data = getattr(A, encode)(tone)
        step = rate // 10 * (1 if "law" in encode else 2)
        for i in range(0, len(data), step):
            await c.send("input_audio_buffer.append", audio=base64.b64encode(data[i:i + step]).decode())
        await c.send("input_audio_buffer.commit")
        await c.send("response.create", response={"max_output_tokens": 6})
        r = check_response(await c.until("response.done"), status="incomplete")
        await c.close()
        return r

    r = run(main())
    assert "1.5s-audio" in r["transcript"], r["transcript"]
    heard = engine.submitted[-1].audio_16k
    assert abs(dominant_hz(heard[1600:], 16000) - 300) < 5 and abs(heard.size - 24000) < 200
