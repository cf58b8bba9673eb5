"""Text-only answers and out-of-band responses over a real socket (fake engine, which records
what each answered turn's prompt held): output_modalities ["text"] sends no audio;
conversation "none" answers from the conversation without joining it; response.input answers
from its own items only, in a private context."""
from __future__ import annotations

import pytest

from server_harness import fake_engine_server, types
from test_server_ga_events import assert_ga
from test_server_items import manual, say
from test_server_session import run


@pytest.fixture(scope="module")
def served():
    with fake_engine_server(answer_words=5) as pair:
        yield pair


async def respond(c, **response) -> list[dict]:
    await c.send("response.create", response=response)
    events = await c.until("response.done")
    assert "error" not in types(events), events
    return events


def test_text_only_answers_send_no_audio(served):
    _, srv = served

    async def main():
        c = await manual(srv)
        await c.send("session.update", session={"type": "realtime", "output_modalities": ["text"]})
        await c.until("session.updated")
        await say(c, "user", "hello")
        by_session = await respond(c)
        await c.send("session.update", session={"type": "realtime", "output_modalities": ["audio"]})
        await c.until("session.updated")
        by_response = await respond(c, output_modalities=["text"])
        await c.close()
        return by_session, by_response

    for events in run(main()):
        t = types(events)
        assert not [x for x in t if "audio" in x], t
        assert "response.output_text.delta" in t and "response.output_text.done" in t
        done = events[-1]["response"]
        assert done["output_modalities"] == ["text"] and done["output"][0]["content"][0]["type"] == "output_text"
        text = next(e for e in events if e["type"] == "response.output_text.done")["text"]
        assert done["output"][0]["content"][0]["text"] == text and text
        assert_ga(events)


def test_conversation_none_answers_from_the_conversation_without_joining_it(served):
    engine, srv = served

    async def main():
        c = await manual(srv)
        await say(c, "user", "hi")
        await respond(c)
        waiting = await say(c, "user", "still waiting")
        oob = await respond(c, conversation="none", metadata={"kind": "summary"})
        await c.send("conversation.item.retrieve", item_id=oob[-1]["response"]["output"][0]["id"])
        missing = (await c.until("error"))[-1]["error"]["code"]
        prompt_oob = engine.prompts[-1]
        await respond(c)
        await c.close()
        return waiting, oob, missing, prompt_oob

    waiting, oob, missing, prompt_oob = run(main())
    t = types(oob)
    assert "conversation.item.added" not in t and "conversation.item.done" not in t, t
    done = oob[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"kind": "summary"}
    assert missing == "item_not_found"          # its output item is not in the conversation
    assert engine.submitted[-2].keep is False
    assert prompt_oob[-1] == "user:text=still_waiting" and prompt_oob[0].startswith("user:text=hi ->")
    # the waiting item stayed waiting for the next in-band answer; the out-of-band answer is forgotten
    assert engine.prompts[-1][-1] == "user:text=still_waiting" and len(engine.prompts[-1]) == 2
    assert_ga(oob)


def test_response_input_is_the_answers_whole_context(served):
    engine, srv = served

    async def main():
        c = await manual(srv)
        hi = await say(c, "user", "hi there")
        await respond(c)
        events = await respond(c, conversation="none", input=[
            {"type": "item_reference", "id": hi["id"]},
            {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Answer yes or no."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "is it a greeting"}]}])
        private = engine.prompts[-1], engine.submitted[-1].session_id
        await say(c, "user", "and now")
        await respond(c)
        await c.close()
        return events, private

    events, (prompt, sid) = run(main())
    assert prompt == ["user:text=hi_there", "system:Answer_yes_or_no.", "user:text=is_it_a_greeting"]
    assert sid not in engine._sessions                      # the private context was closed
    assert len(engine.prompts[-1]) == 2                     # the conversation never saw it
    assert events[-1]["response"]["status"] == "completed"
    assert_ga(events)
