"""The official `openai` Python SDK talks to the server unchanged (base_url pointed at it)."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai SDK is not installed (pip install openai)")
pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import running_server  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(slots=2).start()
    yield eng
    eng.stop()


async def sdk_turn(port: int, api_key: str) -> list:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=api_key, base_url=f"http://127.0.0.1:{port}/v1")
    events = []
    async with client.realtime.connect(model="omni2") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                           "audio": {"input": {"turn_detection": None,
                                                               "format": {"type": "audio/pcm", "rate": 24000}}}})
        tone = (0.2 * np.sin(2 * np.pi * 250 * np.arange(12000) / 24000) * 32767).astype("<i2")
        await conn.input_audio_buffer.append(audio=base64.b64encode(tone.tobytes()).decode())
        await conn.input_audio_buffer.commit()
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "from the sdk"}]})
        await conn.response.create()
        async for event in conn:
            events.append(event)
            if event.type == "response.done":
                break
    await client.close()
    return events


@pytest.mark.parametrize("auth", [False, True])
def test_openai_sdk_realtime_client_gets_a_full_response(engine, auth):
    from openai.types.realtime import (ResponseAudioDeltaEvent, ResponseAudioTranscriptDoneEvent,
                                       ResponseDoneEvent, SessionCreatedEvent, SessionUpdatedEvent)

    keys = ("sdk-key",) if auth else ()
    with running_server(engine, api_keys=keys) as srv:
        events = asyncio.run(asyncio.wait_for(sdk_turn(srv.port, "sdk-key" if auth else "dummy"), 60))
    assert isinstance(events[0], SessionCreatedEvent)
    assert any(isinstance(e, SessionUpdatedEvent) for e in events)
    assert not [e for e in events if e.type == "error"], [e for e in events if e.type == "error"]
    deltas = [e for e in events if isinstance(e, ResponseAudioDeltaEvent)]
    assert deltas and all(len(base64.b64decode(d.delta)) % 2 == 0 for d in deltas)
    transcript = [e for e in events if isinstance(e, ResponseAudioTranscriptDoneEvent)][0].transcript
    assert "text=from_the_sdk" in transcript and "0.5s-audio" in transcript
    done = events[-1]
    assert isinstance(done, ResponseDoneEvent) and done.response.status == "completed"
    assert done.response.usage.output_tokens > 0


def test_openai_sdk_with_a_wrong_key_is_refused(engine):
    with running_server(engine, api_keys=("right",)) as srv:
        with pytest.raises(Exception) as info:
            asyncio.run(asyncio.wait_for(sdk_turn(srv.port, "wrong"), 30))
    assert "401" in str(info.value)
