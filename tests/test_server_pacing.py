"""Paced output (server/pacer.py): audio leaves at most `output_lead_s` ahead of its playback.

Through a real uvicorn server with a fake engine that writes speech 5x faster than it plays:
the client never holds more than the lead (plus a margin for one chunk and scheduling), the
first lead goes at once, the transcript is not held back with the audio, and a cancel after
the answer was fully generated drops the audio not yet sent.
"""
from __future__ import annotations

import asyncio
import base64
import time

from fake_engine import FakeEngine
from server_harness import Client, running_server, types

from omni2.server.pacer import PlayoutClock

LEAD_S = 0.5
CHUNK_S = 0.1          # audio per fake-engine tick
TICK_S = 0.02          # 5x faster than real time
WORDS = 30             # one word a tick: a 3 s answer written in 0.6 s
MARGIN_S = CHUNK_S + 0.15


def test_playout_clock_lets_the_lead_go_at_once_then_follows_playback():
    c = PlayoutClock(lead_s=1.0)
    assert c.may_send(0.3, now=0.0)
    for _ in range(3):
        c.sent(0.3, now=0.0)                        # 0.9 s ahead
    assert not c.may_send(0.3, now=0.0)             # would end 1.2 s ahead
    assert abs(c.due_at(0.3) - 0.2) < 1e-9 and c.may_send(0.3, now=0.2)
    c.sent(0.3, now=0.2)
    assert abs(c.ahead(0.2) - 1.0) < 1e-9
    assert c.ahead(5.0) == 0.0 and c.may_send(3.0, now=5.0)   # ran dry: anything goes
    c.sent(0.3, now=5.0)
    assert abs(c.play_end - 5.3) < 1e-9             # playback resumes when audio arrives



def test_a_chunk_longer_than_the_lead_goes_when_the_player_runs_empty():
    """Not `seconds - lead` later: a 1.6 s chunk behind a 1 s lead used to wait 0.6 s past the
    end of playback, a gap in every such chunk (16 tiny answers heard at 0.76x real time)."""
    c = PlayoutClock(lead_s=1.0)
    c.sent(1.0, now=0.0)                            # plays until 1.0
    assert c.due_at(1.6) == 1.0 and not c.may_send(1.6, now=0.9) and c.may_send(1.6, now=1.0)
    c.sent(1.6, now=1.0)
    assert c.play_end == 2.6 and c.due_at(0.4) == 2.0   # shorter chunks keep the lead rule


async def _answer(srv, cancel_after_s: float | None = None) -> tuple[list[tuple[float, dict]], float]:
    """Ask once; every event with its arrival time; cancel `cancel_after_s` after the first audio."""
    c = await Client.connect(srv.ws)
    await c.recv()  # session.created
    await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    await c.send_text("hello")
    await c.send("response.create")
    timed, first_audio = [], None
    cancelled = False
    while True:
        event = await c.recv()
        now = time.monotonic()
        timed.append((now, event))
        if event["type"] == "response.output_audio.delta" and first_audio is None:
            first_audio = now
        if cancel_after_s is not None and not cancelled and first_audio and now - first_audio >= cancel_after_s:
            await c.send("response.cancel")
            cancelled = True
        if event["type"] == "response.done":
            break
    await c.close()
    return timed, first_audio


def _audio_s(event: dict) -> float:
    return len(base64.b64decode(event["delta"])) / 2 / 24000


def test_audio_runs_at_most_the_lead_ahead_of_playback_and_text_runs_free():
    engine = FakeEngine(slots=2, tick_s=TICK_S, chunk_s=CHUNK_S, words_every=1, answer_words=WORDS).start()
    try:
        with running_server(engine, output_lead_s=LEAD_S) as srv:
            timed, t0 = asyncio.run(asyncio.wait_for(_answer(srv), 30))
    finally:
        engine.stop()
    received, worst = 0.0, 0.0
    lead_reached_at = None
    for t, e in timed:
        if e["type"] != "response.output_audio.delta":
            continue
        received += _audio_s(e)
        ahead = received - (t - t0)        # audio the client holds beyond what has played
        worst = max(worst, ahead)
        if lead_reached_at is None and received >= LEAD_S - 1e-6:
            lead_reached_at = t - t0
    generated = WORDS * CHUNK_S            # (the fake's last tick, which ends it, writes one more chunk)
    assert generated <= received <= generated + CHUNK_S + 1e-6, (received, generated)
    assert worst <= LEAD_S + MARGIN_S, worst
    assert lead_reached_at is not None and lead_reached_at < 0.35, lead_reached_at  # the lead went at once
    done_at = timed[-1][0] - t0
    assert done_at >= generated - LEAD_S - 0.15, done_at           # paced, not as written (0.6 s)
    last_text = max(t for t, e in timed if e["type"] == "response.output_audio_transcript.delta") - t0
    assert last_text < done_at - 1.0, (last_text, done_at)           # the transcript was not held back
    t = types([e for _, e in timed])
    assert t.index("response.output_audio.done") > max(i for i, x in enumerate(t) if x == "response.output_audio.delta")


def test_a_cancel_after_generation_ended_drops_the_audio_not_yet_sent():
    engine = FakeEngine(slots=2, tick_s=TICK_S, chunk_s=CHUNK_S, words_every=1, answer_words=WORDS).start()
    try:
        with running_server(engine, output_lead_s=LEAD_S) as srv:
            timed, t0 = asyncio.run(asyncio.wait_for(_answer(srv, cancel_after_s=1.0), 30))
    finally:
        engine.stop()
    assert engine.steps_total * TICK_S < 10  # sanity: the fake ran
    done = timed[-1][1]
    assert done["response"]["status"] == "cancelled", done
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    received = sum(_audio_s(e) for _, e in timed if e["type"] == "response.output_audio.delta")
    generated = WORDS * CHUNK_S  # the fake wrote it all by 0.6 s, before the cancel
    # what had played (1 s) plus at most the lead was sent; the rest never left
    assert 1.0 <= received <= 1.0 + LEAD_S + MARGIN_S < generated - 1.0, (received, generated)


def test_a_send_that_fails_while_paced_reaches_the_answer_not_a_hang():
    from omni2.server.outbox import SlowReader
    from omni2.server.pacer import AudioPacer

    async def main():
        sent = []

        async def send(item):
            if item == "c":
                raise SlowReader("gone")
            sent.append(item)

        pacer = AudioPacer(0.05, send)
        for item in "abcd":
            await pacer.push(item, 0.04)
        try:
            await asyncio.wait_for(pacer.drained(), 2)
        except SlowReader:
            return sent
        raise AssertionError("no SlowReader")

    assert asyncio.run(main()) == ["a", "b"]


def test_a_closed_pacer_holds_nothing_and_no_longer_keeps_its_owner():
    """close() forgets the held audio, stops the timer and lets go of `send`: a run whose own
    method it is goes by reference counting, not by the cycle collector (issue 19's soak)."""
    import gc
    import weakref

    from omni2.server.pacer import AudioPacer

    class Owner:
        def __init__(self):
            self.sent = []
            self.pacer = AudioPacer(0.05, self.send)

        async def send(self, item):
            self.sent.append(item)

    async def run() -> weakref.ref:
        owner = Owner()
        for i in range(5):  # the first goes at once, the rest wait for playback
            await owner.pacer.push(i, 0.1)
        assert owner.sent == [0] and len(owner.pacer) == 4
        owner.pacer.close()
        await asyncio.sleep(0.3)
        assert owner.sent == [0] and len(owner.pacer) == 0
        return weakref.ref(owner)

    gc.disable()
    try:
        gone = asyncio.run(run())
        assert gone() is None, "the closed pacer still keeps its owner (a reference cycle)"
    finally:
        gc.enable()
