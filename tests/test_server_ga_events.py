"""Strict GA clients: every server event parses as the API's own models (the `openai`
package's RealtimeServerEvent union, validated the way the Python Agents SDK does it), with
omni2's extension fields in them, and omni2's extension events go out only on request.

One session walks through most of the protocol over a real socket (uvicorn on loopback,
websockets client, fake engine, espeak speech and the real VAD); every event it receives must
validate.
"""
from __future__ import annotations

import asyncio
import json
from typing import Annotated

import pytest

pytest.importorskip("openai", reason="the openai SDK is not installed (pip install openai)")
pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from pydantic import Field, TypeAdapter  # noqa: E402

from server_harness import Client, fake_engine_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402


def ga_adapter() -> TypeAdapter:
    from openai.types.realtime import RealtimeServerEvent

    return TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])


def assert_ga(events: list[dict]) -> None:
    adapter = ga_adapter()
    for event in events:
        parsed = adapter.validate_python(event)  # raises on anything a strict client refuses
        assert parsed.type == event["type"]


@pytest.fixture(scope="module")
def server():
    with fake_engine_server(answer_words=6, context_turns=2) as (_, srv):
        yield srv


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def typed_turns(c: Client, n: int, **response) -> list[dict]:
    events = []
    for i in range(n):
        await c.send_text(f"question {i}")
        await c.send("response.create", **({"response": response} if response else {}))
        events += await c.until("response.done")
    return events


@requires_speech
def test_every_event_of_a_busy_session_is_a_ga_event(server):
    audio, _, _ = utterance("what is the weather like", lead_s=0.5, tail_s=1.2)

    async def main():
        c = await Client.connect(server.ws)
        await c.recv()
        await c.send("session.update", session={
            "type": "realtime", "instructions": "be brief", "tools": [{"type": "function", "name": "f"}],
            "audio": {"input": {"turn_detection": {"type": "server_vad"}}, "output": {"voice": "ash"}}})
        await c.until("session.updated")
        await stream_audio(c, resample(audio, 16000, 24000))              # a spoken turn (VAD)
        spoken = await c.until("response.done")
        answer_id = spoken[-1]["response"]["output"][0]["id"]
        user_id = next(e["item_id"] for e in spoken if e["type"] == "input_audio_buffer.committed")
        for item_id in (user_id, answer_id):
            await c.send("conversation.item.retrieve", item_id=item_id)
            await c.until("conversation.item.retrieved")
        await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await c.until("session.updated")
        await c.send("conversation.item.truncate", item_id=answer_id, content_index=0, audio_end_ms=100)
        await c.until("conversation.item.truncated")
        await c.send("conversation.item.delete", item_id=answer_id)
        await c.until("conversation.item.deleted")
        await c.send("input_audio_buffer.append", audio="AAAA")
        await c.send("input_audio_buffer.clear")
        await c.until("input_audio_buffer.cleared")
        await c.send_raw("{not json")
        await c.until("error")
        await typed_turns(c, 3, output_modalities=["text"], metadata={"n": "1"})  # fills the window
        await c.close()
        return c.seen

    seen = run(main())
    got = set(types(seen))
    assert {"session.created", "session.updated", "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
            "conversation.item.done", "response.created", "response.output_audio.delta",
            "response.output_audio_transcript.done", "conversation.item.retrieved",
            "conversation.item.truncated", "conversation.item.deleted", "input_audio_buffer.cleared",
            "error", "response.output_text.delta", "response.output_text.done", "response.done"} <= got, got
    assert "notes" in [e for e in seen if e["type"] == "session.updated"][0]   # extension fields ride along
    assert "conversation.context.truncated" not in got                          # extension events do not
    assert_ga(seen)


def test_extension_events_come_to_clients_that_ask(server):
    async def session(url: str, update: dict) -> list[dict]:
        c = await Client.connect(url)
        await c.recv()
        await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}},
                                                **update})
        updated = (await c.until("session.updated"))[-1]["session"]
        events = await typed_turns(c, 3)
        await c.close()
        return [updated] + events

    async def main():
        return (await session(server.ws + "?omni2_extensions=1", {}),
                await session(server.ws, {"omni2_extensions": True}),
                await session(server.ws, {}))

    by_query, by_field, strict = run(main())
    for events in (by_query, by_field):
        assert events[0]["omni2_extensions"] is True
        cut = [e for e in events[1:] if e["type"] == "conversation.context.truncated"]
        assert len(cut) == 1 and len(cut[0]["item_ids"]) == 2, types(events[1:])
    assert "omni2_extensions" not in strict[0]
    assert "conversation.context.truncated" not in types(strict[1:])
    assert_ga(strict[1:])


def test_the_session_object_with_omni2_fields_parses_as_the_sdks_models(server):
    """session.created carries model_fallback and sampling fields: the SDK's own session
    models (as the Agents SDK normalizes them) must still take it."""
    from openai.types.realtime import RealtimeSessionCreateRequest

    async def main():
        c = await Client.connect(server.ws)
        created = await c.recv()
        await c.close()
        return created

    session = run(main())["session"]
    assert {"model_fallback", "temperature", "top_k", "seed"} <= set(session)
    parsed = RealtimeSessionCreateRequest.model_validate(session)
    assert parsed.audio.output.format.type == "audio/pcm"
    assert json.loads(parsed.model_dump_json())["type"] == "realtime"


def ga_event_names(union) -> list[str]:
    import typing

    members = typing.get_args(typing.get_args(union)[0])
    return [typing.get_args(m.model_fields["type"].annotation)[0] for m in members]


def readme_rows() -> list[tuple[set, list[str]]]:
    """server/README.md's table rows: (event names of the first cell, the row's cells). A
    cell's `.suffix` continues the name before it; `prefix.*` covers a family."""
    import re
    from pathlib import Path

    rows = []
    for line in (Path(__file__).parents[1] / "server" / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names, last = set(), ""
        for token in re.findall(r"`([^`]+)`", cells[0]):
            name = last.rsplit(".", 1)[0] + token if token.startswith(".") else token
            names.add(name)
            last = name
        rows.append((names, cells))
    return rows


def test_the_readme_says_what_omni2_does_with_every_ga_event():
    from openai.types.realtime import realtime_client_event, realtime_server_event

    rows = readme_rows()
    for union in (realtime_client_event.RealtimeClientEvent, realtime_server_event.RealtimeServerEvent):
        for name in ga_event_names(union):
            found = [cells for names, cells in rows
                     if name in names or any(n.endswith(".*") and name.startswith(n[:-1]) for n in names)]
            assert found, f"server/README.md has no row for {name}"
            assert found[0][1] in ("yes", "no", "beta clients"), (name, found[0][1])
