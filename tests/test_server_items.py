"""Conversation items the way voice-agent frameworks use them, over a real socket (uvicorn on
loopback, websockets client, fake engine): retrieve, delete (gone from the next prompt too),
assistant and system items, previous_item_id "root", response.create with nothing new, and
response metadata. The fake engine records what each answered turn's prompt held.
"""
from __future__ import annotations

import numpy as np
import pytest

from server_harness import running_server, types
from test_server_session import MANUAL, check_response, connect, engine, run, server, update  # noqa: F401


async def manual(server):
    """A connection with turn detection off (turns by commit / response.create)."""
    c = await connect(server)
    await update(c, MANUAL)
    return c


def message(role: str, text: str, **kw) -> dict:
    """Fields of a conversation.item.create with one text part (for Client.send)."""
    kind = {"user": "input_text", "system": "input_text", "assistant": "output_text"}[role]
    return {"type_": "conversation.item.create", **kw,
            "item": {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}}


async def say(c, role: str, text: str, **kw) -> dict:
    """Create one message item; returns its conversation.item.done item."""
    await c.send(**message(role, text, **kw))
    got = await c.until("conversation.item.done")
    assert types(got) == ["conversation.item.added", "conversation.item.done"], types(got)
    return got[-1]["item"]


async def answer(c, **response) -> dict:
    await c.send("response.create", **({"response": response} if response else {}))
    events = await c.until("response.done")
    assert "error" not in types(events), events
    return check_response(events)


def test_retrieve_returns_each_item_as_it_stands(server):
    async def main():
        c = await manual(server)
        user = await say(c, "user", "hello there")
        await c.send("conversation.item.retrieve", item_id=user["id"], event_id="r1")
        got = (await c.until("conversation.item.retrieved"))[-1]
        assert got["item"] == user
        summary = await answer(c)
        await c.send("conversation.item.retrieve", item_id=summary["item_id"])
        item = (await c.until("conversation.item.retrieved"))[-1]["item"]
        assert (item["role"], item["status"]) == ("assistant", "completed")
        assert item["content"] == [{"type": "output_audio", "transcript": summary["transcript"]}]
        await c.send("conversation.item.retrieve", item_id="item_nope", event_id="r2")
        err = (await c.until("error"))[-1]["error"]
        assert (err["code"], err["param"], err["event_id"]) == ("item_not_found", "item_id", "r2")
        await c.close()

    run(main())


def test_a_deleted_item_is_gone_from_the_next_prompt(server, engine):
    async def main():
        c = await manual(server)
        one = await say(c, "user", "one")
        first = await answer(c)
        await say(c, "user", "two")
        second = await answer(c)
        await c.send("conversation.item.delete", item_id=one["id"], event_id="d1")
        got = await c.until("conversation.item.deleted")
        assert types(got) == ["conversation.item.deleted"] and got[-1]["item_id"] == one["id"]
        await c.send("conversation.item.delete", item_id=second["item_id"])
        await c.until("conversation.item.deleted")
        pending = await say(c, "user", "never asked")
        await c.send("conversation.item.delete", item_id=pending["id"])
        await c.until("conversation.item.deleted")
        await say(c, "user", "three")
        await answer(c)
        await c.send("conversation.item.retrieve", item_id=one["id"])
        assert (await c.until("error"))[-1]["error"]["code"] == "item_not_found"
        await c.close()
        return first, second

    first, second = run(main())
    prompt = engine.prompts[-1]
    sid = engine.submitted[-1].session_id
    # turn 1 keeps only its answer, turn 2 only its question; the deleted pending text never went
    assert prompt == [f"assistant:{'_'.join(first['transcript'].split())}", "user:text=two", "user:text=three"]
    assert [part for s, _, part in engine.forgotten if s == sid] == ["prompt", "answer"]


def test_an_answer_interrupted_before_any_audio_played_can_be_deleted(server, engine):
    """What frameworks do on an interruption at 0 ms: truncate to 0, then delete the answer."""
    async def main():
        c = await manual(server)
        await say(c, "user", "tell me a long story")
        await c.send("response.create")
        item_id = (await c.until("response.output_item.added"))[-1]["item"]["id"]
        await c.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
        await c.send("conversation.item.delete", item_id=item_id)
        events = await c.until("conversation.item.deleted")
        events += [] if "response.done" in types(events) else await c.until("response.done")
        assert "error" not in types(events), events
        assert "conversation.item.truncated" in types(events)
        assert [e for e in events if e["type"] == "response.done"][0]["response"]["status"] == "cancelled"
        await say(c, "user", "shorter please")
        await answer(c)
        await c.close()

    run(main())
    assert engine.prompts[-1] == ["user:text=tell_me_a_long_story", "user:text=shorter_please"]


def test_response_create_with_nothing_new_answers_from_the_conversation(server, engine):
    async def main():
        c = await manual(server)
        greeting = await answer(c)               # nothing at all yet: a greeting
        await say(c, "user", "hi")
        await answer(c)
        again = await answer(c)                  # say something more, nothing new from the user
        await c.close()
        return greeting, again

    greeting, again = run(main())
    assert "about nothing" in greeting["transcript"] and "about nothing" in again["transcript"]
    assert engine.prompts[-1][-1] == "user:nothing" and engine.prompts[-1][0].startswith("user:nothing ->")


def test_metadata_is_echoed_in_response_created_and_done(server):
    async def main():
        c = await manual(server)
        await c.send("response.create", response={"metadata": {"purpose": "greeting", "turn": "1"}})
        events = await c.until("response.done")
        await c.close()
        return events

    events = run(main())
    created = [e for e in events if e["type"] == "response.created"][0]
    assert created["response"]["metadata"] == events[-1]["response"]["metadata"] == {"purpose": "greeting", "turn": "1"}


def test_system_and_assistant_items_join_the_context_in_order(server, engine):
    async def main():
        c = await manual(server)
        system = await say(c, "system", "Be brief.", previous_item_id="root")
        assert (system["role"], system["content"]) == ("system", [{"type": "input_text", "text": "Be brief."}])
        await say(c, "user", "what is up")
        said = await say(c, "assistant", "Not much.", previous_item_id=None)
        assert (said["role"], said["content"]) == ("assistant", [{"type": "output_text", "text": "Not much."}])
        await say(c, "user", "and now")
        await answer(c)
        errors = [e for e in c.seen if e["type"] == "error"]
        await c.close()
        return errors

    assert run(main()) == []
    assert engine.prompts[-1] == ["system:Be_brief.", "user:text=what_is_up", "assistant:Not_much.", "user:text=and_now"]


def test_previous_item_id_root_starts_an_empty_conversation_only(server):
    async def main():
        c = await manual(server)
        first = await say(c, "user", "first", previous_item_id="root")
        second = await say(c, "user", "second", previous_item_id=first["id"])
        await c.send(**message("user", "third", previous_item_id="root"))
        err = (await c.until("error"))[-1]["error"]
        assert (err["code"], err["param"]) == ("invalid_value", "previous_item_id")
        assert second["id"] in err["message"]
        await c.send(**message("user", "after the refusal", previous_item_id=second["id"]))
        await c.until("conversation.item.done")
        await c.close()

    run(main())


# ---- the real engine (tiny model): a deleted item is gone from the model's context ------------
@pytest.fixture(scope="module")
def tiny_server():
    from server_harness import tiny_engine

    with tiny_engine(max_sessions=2) as eng, running_server(eng, max_sessions=2) as srv:
        yield srv


async def spoken_answer(c, **response) -> tuple:
    """The answer's audio bytes, transcript and prompt size (greedy: the same context gives
    the same answer, byte for byte)."""
    await c.send("response.create", response={"max_output_tokens": 12, **response})
    events = await c.until("response.done")
    audio = b"".join(__import__("base64").b64decode(e["delta"]) for e in events
                     if e["type"] == "response.output_audio.delta")
    done = events[-1]["response"]
    assert done["status"] in ("completed", "incomplete"), done
    return audio, done["output"][0]["content"][0]["transcript"], done["usage"]["input_tokens"]


def test_deleted_items_leave_the_models_context(tiny_server):
    """Session A deletes a whole earlier turn and a system item that sits before an assistant
    item (re-prefilled without it); session B never had them. Their next answers are equal."""
    async def main():
        a = await manual(tiny_server)
        one = await say(a, "user", "one")
        first = await spoken_answer(a)
        done = [e for e in a.seen if e["type"] == "response.done"][-1]["response"]
        system = await say(a, "system", "alpha")
        await say(a, "assistant", "beta gamma")
        for item_id in (one["id"], done["output"][0]["id"], system["id"]):
            await a.send("conversation.item.delete", item_id=item_id)
            await a.until("conversation.item.deleted")
        await say(a, "user", "three")
        after = await spoken_answer(a)
        await a.close()

        b = await manual(tiny_server)
        await say(b, "assistant", "beta gamma")
        await say(b, "user", "three")
        fresh = await spoken_answer(b)
        await b.close()
        return first, after, fresh

    first, after, fresh = run(main())
    # The same text and prompt size, exactly; the audio has the same length and the same samples
    # up to float rounding: the vocoder's windows are cut where the answer had got to when it
    # looked (timing: under load they differ), and SNAC's output over differently cut windows
    # equals up to rounding (streaming/engine/frame_decoder.py). A different audio token would
    # change whole frames by far more than that.
    assert after[1:] == fresh[1:] and after[0]
    a, f = (np.frombuffer(x[0], dtype="<i2").astype(np.int32) for x in (after, fresh))
    assert a.size == f.size and int(np.abs(a - f).max()) <= 2, (a.size, f.size, int(np.abs(a - f).max()))
    assert first[0] != after[0]
