"""The OpenAI Agents SDK for Python (`openai-agents`) drives omni2 unchanged: its
RealtimeRunner with `model_config` pointing at the server, through a spoken turn and an
interruption, with zero error events.

The SDK validates every server event against the GA models, sends semantic_vad turn
detection and input transcription by default, truncates the interrupted answer and retrieves
the item afterwards: each of these used to end in an error event. Fake engine (long answers,
so there is something to interrupt), espeak speech, the real VAD and recognizer. And two SDK
sessions at once against the multi-process server (`omni2 serve --model null --workers 2
--gateway-share 1`): one on each gateway, each a spoken turn answered without an error event.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

pytest.importorskip("agents.realtime", reason="openai-agents is not installed (pip install openai-agents)")
pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import fake_engine_server, peak_connections, two_gateways  # noqa: E402,F401
from speech import requires_speech, resample, utterance  # noqa: E402

CHUNK = 4800  # bytes of 24 kHz PCM16: 100 ms, as a microphone would send


def pcm16(text: str, lead_s: float) -> bytes:
    audio, _, _ = utterance(text, lead_s=lead_s, tail_s=1.0)
    return (np.clip(resample(audio, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


async def speak(session, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        await session.send_audio(pcm[i:i + CHUNK])
        await asyncio.sleep(0.03)   # a bit faster than real time


async def until(events: list, predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(predicate(e) for e in events):
        assert time.monotonic() < deadline, f"no {what}; got {[e.type for e in events]}"
        await asyncio.sleep(0.02)


def raw_type(event) -> str | None:
    """The server event type inside a raw_model_event, if it is one."""
    if event.type == "raw_model_event" and event.data.type == "raw_server_event":
        return event.data.data.get("type")
    return None


@contextlib.asynccontextmanager
async def sdk_session(url: str):
    """A RealtimeRunner session against `url` and the list its events are read into meanwhile."""
    from agents.realtime import RealtimeAgent, RealtimeRunner

    runner = RealtimeRunner(RealtimeAgent(name="omni", instructions="Answer briefly."))
    session = await runner.run(model_config={"url": url, "api_key": "unused"})
    events: list = []
    async with session:
        async def read():
            async for event in session:
                events.append(event)
        reader = asyncio.create_task(read())
        try:
            yield session, events
        finally:
            reader.cancel()


@requires_speech
def test_agents_sdk_spoken_turn_and_interruption_without_errors():
    async def main(url: str) -> tuple[list, list]:
        async with sdk_session(url) as (session, events):
            await speak(session, pcm16("what is the weather like today", lead_s=0.3))
            await until(events, lambda e: e.type == "audio", "answer audio")
            await speak(session, pcm16("stop, tell me something else", lead_s=0.1))   # barge in
            await until(events, lambda e: e.type == "audio_interrupted", "interruption")
            await until(events, lambda e: raw_type(e) == "conversation.item.retrieved", "item retrieved")
            await until(events, lambda e: e.type == "agent_end", "first answer ended")
            await until(events, lambda e: [x.type for x in events].count("agent_end") >= 2,
                        "second answer ended", timeout=40)
            history = list(session._history)
        return events, history

    with fake_engine_server(answer_words=40) as (engine, srv):
        events, history = asyncio.run(asyncio.wait_for(main(srv.ws), 90))

    errors = [e for e in events if e.type == "error"]
    raw_errors = [e for e in events if raw_type(e) == "error"]
    assert errors == [] and raw_errors == [], (errors, raw_errors)
    raw = [raw_type(e) for e in events]
    assert "conversation.item.truncated" in raw
    dones = [e.data.data["response"] for e in events if raw_type(e) == "response.done"]
    assert [d["status"] for d in dones] == ["cancelled", "completed"], dones
    assert len(engine.submitted) >= 2
    roles = [item.role for item in history if item.type == "message"]
    assert roles.count("user") == 2 and roles.count("assistant") == 2, roles
    # the SDK's default input transcription, served by the offline recognizer
    heard = [part.transcript or "" for item in history if item.type == "message" and item.role == "user"
             for part in item.content if part.type == "input_audio"]
    assert "weather" in heard[0].lower() and "something else" in heard[1].lower(), heard


async def spoken_turn(url: str) -> tuple[list, list]:
    """One spoken question through a RealtimeRunner session, until its answer ends: (events, history)."""
    async with sdk_session(url) as (session, events):
        await speak(session, pcm16("what is the weather like today", lead_s=0.3))
        await until(events, lambda e: e.type == "agent_end", "answer ended")
        await until(events, lambda e: raw_type(e) == "conversation.item.input_audio_transcription.completed",
                    "input transcription")
        return events, list(session._history)


@requires_speech
def test_agents_sdk_on_both_gateways_of_the_multi_process_server(two_gateways):
    async def both(url: str):
        return await asyncio.gather(spoken_turn(url), spoken_turn(url))

    with peak_connections(two_gateways) as peak:
        runs = asyncio.run(asyncio.wait_for(both(two_gateways.ws), 60))
    assert peak == {1: 1, 2: 1}, peak
    for events, history in runs:
        assert [e for e in events if e.type == "error" or raw_type(e) == "error"] == []
        dones = [e.data.data["response"]["status"] for e in events if raw_type(e) == "response.done"]
        assert dones == ["completed"], dones
        assert any(e.type == "audio" for e in events)
        heard = [part.transcript or "" for item in history if item.type == "message" and item.role == "user"
                 for part in item.content if part.type == "input_audio"]
        assert len(heard) == 1 and "weather" in heard[0].lower(), heard
