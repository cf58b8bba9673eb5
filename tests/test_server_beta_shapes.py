"""Clients of the beta Realtime protocol (`OpenAI-Beta: realtime=v1`) get beta shapes, not
only beta names: the flat session object (`modalities`, `input_audio_format`, ...) and the
beta content part types (`audio` / `text`, where GA says `output_audio` / `output_text`).

Every event a beta client receives that the beta protocol defines is validated against the
`openai` package's beta models (real uvicorn on loopback, websockets client, fake engine).
"""
from __future__ import annotations

import asyncio

import pytest

pydantic = pytest.importorskip("pydantic")
beta_types = pytest.importorskip("openai.types.beta.realtime",
                                 reason="the openai SDK with its beta realtime types is not installed")

from server_harness import Client, fake_engine_server, types  # noqa: E402

from omni2.server.outbox import Outbox  # noqa: E402

BETA = pydantic.TypeAdapter(beta_types.RealtimeServerEvent)
BETA_TYPES = {m.model_fields["type"].annotation.__args__[0]
              for m in beta_types.RealtimeServerEvent.__args__[0].__args__}


def beta_problems(events: list[dict]) -> list[tuple[str, str]]:
    """(type, validation error) of each event the beta protocol defines and its models refuse.
    The model name is the server's own (no beta model literal can hold it), so it is set
    to a listed one before validating."""
    bad = []
    for e in events:
        if e["type"] not in BETA_TYPES:
            continue   # GA-only events (conversation.item.done): beta clients ignore them
        if "session" in e:
            e = {**e, "session": {**e["session"], "model": "gpt-4o-realtime-preview"}}
        try:
            BETA.validate_python(e)
        except pydantic.ValidationError as exc:
            bad.append((e["type"], str(exc)))
    return bad


@pytest.fixture(scope="module")
def server():
    with fake_engine_server(max_sessions=2) as (_, srv):
        yield srv


def test_beta_client_gets_beta_session_and_content_shapes(server):
    async def main():
        c = await Client.connect(server.ws, headers={"OpenAI-Beta": "realtime=v1"})
        got = await c.until("session.created")
        await c.send("session.update", session={
            "modalities": ["text", "audio"], "voice": "alloy", "instructions": "be brief",
            "input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw",
            "turn_detection": None, "max_response_output_tokens": 50})
        got += await c.until("session.updated")
        await c.send_text("hello")
        await c.send("response.create")
        got += await c.until("response.done")
        await c.send_text("again")
        await c.send("response.create", response={"modalities": ["text"]})
        got += await c.until("response.done")
        item_id = got[-1]["response"]["output"][0]["id"]
        await c.send("conversation.item.retrieve", item_id=item_id)
        got += await c.until("conversation.item.retrieved")
        await c.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), 60))
    assert beta_problems(got) == []
    session = [e for e in got if e["type"] == "session.updated"][-1]["session"]
    assert session["input_audio_format"] == "g711_ulaw" and session["output_audio_format"] == "g711_alaw"
    assert session["modalities"] == ["text", "audio"] and session["voice"] == "alloy"
    assert session["turn_detection"] is None and session["max_response_output_tokens"] == 50
    t = types(got)
    assert "response.audio.delta" in t and "response.text.delta" in t
    parts = [e["part"]["type"] for e in got if e["type"] == "response.content_part.added"]
    assert parts == ["audio", "text"]
    audio_done, text_done = [e["response"] for e in got if e["type"] == "response.done"]
    assert audio_done["output"][0]["content"][0]["type"] == "audio"
    assert audio_done["modalities"] == ["text", "audio"] and audio_done["output_audio_format"] == "g711_alaw"
    assert text_done["output"][0]["content"][0]["type"] == "text" and text_done["modalities"] == ["text"]
    retrieved = got[-1]["item"]
    assert retrieved["content"][0]["type"] == "text"


def test_ga_clients_keep_ga_shapes():
    """The translation is for beta clients only; the GA event is not changed in place."""
    part = {"type": "output_audio", "transcript": ""}
    event = {"type": "response.content_part.added", "part": part}
    assert '"output_audio"' in Outbox(4, 1.0).encode(event)
    assert '"type":"audio"' in Outbox(4, 1.0, beta_names=True).encode(event)
    assert part["type"] == "output_audio"
