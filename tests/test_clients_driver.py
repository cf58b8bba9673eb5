"""The load tools' session driver (clients/driver.py): how a session's end is counted; one
answer's figures and an answer followed through its events (clients/figures.py); and the send
schedule they and `send_audio` keep (realtime_client.Pacer). The
classification runs against a real server on loopback; the rest on made-up events and clocks."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import types

import pytest
from websockets.exceptions import ConnectionClosed

from omni2.clients import realtime_client
from omni2.clients.driver import SessionTally, open_session
from omni2.clients.figures import AnswerTracker, answer_figures, arrival_rate
from omni2.clients.realtime_client import Pacer, RealtimeError


def delta(samples: int) -> dict:
    return {"type": "response.output_audio.delta", "delta": base64.b64encode(b"\0\0" * samples).decode()}


def test_sessions_are_counted_as_connected_refused_capped_or_failed():
    pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")
    from server_harness import fake_engine_server
    from test_server_serve import free_port

    async def run(url: str) -> tuple[SessionTally, list]:
        tally = SessionTally()
        held = [await open_session(url, None, tally, 0)]                # the one session allowed
        held.append(await open_session(url, None, tally, 1))           # 1013: server_busy
        port = int(url.split(":")[2].split("/")[0])
        _, idle = await asyncio.open_connection("127.0.0.1", port)      # the second connection from here
        await asyncio.sleep(0.2)
        held.append(await open_session(url, None, tally, 2))           # a third: 503 at the cap
        held.append(await open_session(f"ws://127.0.0.1:{free_port()}/v1/realtime", None, tally, 3))
        idle.close()
        for c in held:
            if c is not None:
                await c.close()
        return tally, held

    with fake_engine_server(max_sessions=1, settings={"max_connections_per_client": 2}) as (_, srv):
        tally, held = asyncio.run(run(srv.ws))
    assert [c is not None for c in held] == [True, False, False, False]
    assert (tally.connected, tally.refused, tally.capped) == (1, 1, 1), tally
    assert len(tally.errors) == 1 and tally.errors[0].startswith("session 3: connect_failed: "), tally.errors


def test_holding_counts_what_broke_the_session_and_closes_it():
    class Client:
        closed = 0

        async def close(self):
            self.closed += 1

    async def run(tally: SessionTally, client, exc) -> None:
        async with tally.holding(7, client):
            if exc is not None:
                raise exc

    tally, client = SessionTally(), Client()
    asyncio.run(run(tally, client, None))
    asyncio.run(run(tally, client, RealtimeError("protocol", "expected session.updated")))
    asyncio.run(run(tally, client, OSError("reset by peer")))
    assert client.closed == 3
    assert tally.errors == ["session 7: protocol: expected session.updated", "session 7: OSError: reset by peer"]
    with pytest.raises(asyncio.CancelledError):          # a cancelled run is not a session's error
        asyncio.run(run(tally, client, asyncio.CancelledError()))
    assert client.closed == 4 and len(tally.errors) == 2
    total = SessionTally(connected=2, refused=1)
    total.add(tally)
    assert (total.connected, total.refused, total.errors) == (2, 1, tally.errors)


def test_answer_figures_from_arrivals():
    arrivals = [(10.0, 12000), (11.0, 12000), (12.0, 12000)]      # 0.5 s of audio a second
    f = answer_figures("completed", arrivals, asked_at=9.75, jitter_s=0.2, done_at=12.5)
    assert f.ttfa_s == pytest.approx(0.25) and f.audio_s == pytest.approx(1.5)
    assert f.wall_s == pytest.approx(2.75)
    assert f.rate == pytest.approx(0.5) and f.gaps == 2            # played out before the next came
    assert answer_figures("completed", arrivals, 10.5, 0.2).ttfa_s is None   # asked after it began: unknown
    assert answer_figures("completed", arrivals, None, 0.2).ttfa_s is None
    none = answer_figures("timeout", [], None, 0.2)
    assert (none.ttfa_s, none.audio_s, none.gaps, none.rate, none.wall_s) == (None, 0.0, 0, None, None)


def test_arrival_rate_is_audio_after_the_first_delta_per_second():
    # three deltas of 0.5 s of audio, 1 s apart: after the first, 1 s of audio in 2 s
    arrivals = [(10.0, 12000), (11.0, 12000), (12.0, 12000)]
    assert arrival_rate(arrivals) == pytest.approx(0.5)
    assert arrival_rate([(0.0, 24000), (0.5, 24000)]) == pytest.approx(2.0)
    assert arrival_rate(arrivals[:1]) is None and arrival_rate([]) is None


def test_tracker_follows_answers_through_events():
    t = AnswerTracker(jitter_s=0.2)
    assert t.feed({"type": "input_audio_buffer.speech_stopped"}, 1.0) is None
    t.feed({"type": "response.created"}, 1.1)
    assert not t.playing
    t.feed(delta(12000), 1.3)
    assert t.playing
    t.stopped_by_user = True
    t.feed(delta(12000), 1.6)
    open_so_far = t.figures("open")
    assert open_so_far.ttfa_s == pytest.approx(0.3) and open_so_far.audio_s == pytest.approx(1.0)
    done = t.feed({"type": "response.done", "response": {"status": "cancelled"}}, 1.8)
    assert done.status == "cancelled" and done.stopped_by_user and done.ttfa_s == pytest.approx(0.3)
    assert done.wall_s == pytest.approx(0.8) and done.gaps == 0
    assert t.heard_until == pytest.approx(1.3 + 0.2 + 1.0)         # first audio + buffer + its length
    assert not t.playing and t.asked_at is None
    # the next answer starts fresh: not stopped by the user, and no question end known
    t.feed({"type": "response.created"}, 3.0)
    t.feed(delta(2400), 3.2)
    nxt = t.feed({"type": "response.done", "response": {"status": "completed"}}, 3.3)
    assert nxt.ttfa_s is None and not nxt.stopped_by_user and nxt.audio_s == pytest.approx(0.1)
    # a speech_stopped from before a new question (the stop phrase, say) is not its end
    t.feed({"type": "input_audio_buffer.speech_stopped"}, 4.0)
    t.new_question()
    assert t.asked_at is None



class ScriptedConn:
    """A connection whose server events arrive at set times on `clock` (then it closes)."""

    def __init__(self, clock: list, script: list):
        self.clock, self.script, self.sent = clock, list(script), []

    async def send(self, data: str) -> None:
        self.sent.append(json.loads(data)["type"])

    async def recv(self) -> str:
        if not self.script:
            raise ConnectionClosed(None, None)
        self.clock[0], event = self.script.pop(0)
        return json.dumps(event)


def asked(monkeypatch, script: list, jitter_s: float) -> tuple:
    """One typed question asked at t=10 of a server that answers by `script`: the answer and what was sent."""
    clock = [10.0]
    monkeypatch.setattr(realtime_client, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                                      monotonic_ns=time.monotonic_ns))
    conn = ScriptedConn(clock, script)
    answer = asyncio.run(realtime_client.RealtimeClient(conn).ask(text="hi", pace=0.0, jitter_s=jitter_s))
    return answer, conn.sent


ANSWER = [(10.3, {"type": "response.created"}), (10.5, delta(2400)), (10.9, delta(2400))]


@pytest.mark.parametrize("jitter_s, gaps", [(0.1, 1), (0.5, 0)], ids=["100ms-buffer", "500ms-buffer"])
def test_ask_takes_its_figures_from_the_tracker(monkeypatch, jitter_s, gaps):
    done = (11.5, {"type": "response.done", "response": {"status": "completed"}})
    answer, sent = asked(monkeypatch, ANSWER + [done], jitter_s)
    assert sent == ["conversation.item.create", "response.create"]
    assert (answer.status, answer.done_at, answer.figures.status) == ("completed", 11.5, "completed")
    assert answer.ttfa_s == pytest.approx(0.5) and answer.wall_s == pytest.approx(1.5)
    assert answer.audio_s == pytest.approx(0.2) and len(answer.pcm) == 2 * 4800   # the tracker's audio is the answer's
    assert answer.figures.gaps == gaps         # counted behind the buffer ask() was given


def test_ask_keeps_the_figures_of_an_answer_cut_off(monkeypatch):
    answer, _ = asked(monkeypatch, ANSWER, 0.1)                     # no response.done: the socket closes
    assert answer.done_at is None and answer.errors == ["connection closed (None)"]
    assert answer.ttfa_s == pytest.approx(0.5) and answer.audio_s == pytest.approx(0.2)
    assert answer.wall_s is None and answer.figures.gaps == 1 and answer.figures.status == "none"


def test_pacer_sleeps_to_its_schedule_and_says_how_late(monkeypatch):
    now = [100.0]

    async def sleep(s):
        now[0] += s
    monkeypatch.setattr(realtime_client.asyncio, "sleep", sleep)

    async def run() -> list[float]:
        pacer = Pacer(0.1, clock=lambda: now[0])
        lates = []
        for took in (0.03, 0.03, 0.25, 0.01, 0.01, 0.01):      # how long each send takes
            now[0] += took
            lates.append(await pacer.sent_one())
        return lates, pacer

    lates, pacer = asyncio.run(run())
    # each send is done `took` after its due time (100.0, 100.1, 100.2, ...); the slow one makes
    # the next two later still, then the schedule is kept again: no drift from the sends' time
    assert lates == pytest.approx([0.03, 0.03, 0.25, 0.16, 0.07, 0.01])
    assert pacer.sent == 6 and now[0] == pytest.approx(100.6)
