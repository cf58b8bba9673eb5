"""No client message ends a session, and no client state holds one for ever (server/guard.py).

Real uvicorn on loopback, real websockets clients, fake engine, real silero VAD. The fuzz test
draws realtime events with wrong and extreme values (tests/fuzz_events.py); after each one a
probe event must come back answered, so every message is proven handled with the session
alive. A quick run is in the default suite; `-m slow` sends >= 10,000 fuzzed events.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[dev])")

from fake_engine import FakeEngine  # noqa: E402
from fuzz_events import audio_formats, messages  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_harness import Client, running_server, stream_audio, types  # noqa: E402
from speech import requires_speech, resample, utterance  # noqa: E402

from omni2.server.guard import SessionClock  # noqa: E402
from omni2.server.settings import ServerSettings  # noqa: E402

MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(slots=8, answer_words=4).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, max_sessions=8, image_min_interval_s=0.0) as srv:
        yield srv


async def connect(srv) -> Client:
    c = await Client.connect(srv.ws)
    assert (await c.recv())["type"] == "session.created"
    return c


async def answered(c: Client, probe: int, timeout: float = 20) -> list[dict]:
    """Send a probe event and return every event up to its answer: all that was sent before it
    was handled, and the session is alive."""
    await c.send("omni2.probe", event_id=f"probe-{probe}")
    got = []
    while True:
        got.append(await c.recv(timeout))
        e = got[-1]
        if e["type"] == "error" and e["error"].get("event_id") == f"probe-{probe}":
            return got[:-1]


# ---- the inputs of the issue: each an error event, the session goes on ----------------------
PROBES = [
    ('{"type": "session.update", "session": {"audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": 1e999}}}}}', "invalid_value"),           # rate = +inf
    ('{"type": "session.update", "session": {"audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": -1e999}}}}}', "invalid_value"),          # rate = -inf
    ('{"type": "session.update", "session": {"audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": Infinity}}}}}', "invalid_json"),         # not JSON at all
    *[(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}), "invalid_value")
      for fmt in ({"type": "audio/pcm", "rate": 44101}, {"type": "audio/pcm", "rate": 8001},
                  {"type": "audio/pcm", "rate": 47999}, "audio/pcm;rate=16001")],
    ('{"type": "session.update", "session": {"seed": ' + "7" * 4301 + "}}", "invalid_json"),
    ('{"type": "response.create", "response": {"max_output_tokens": ' + "9" * 5000 + "}}", "invalid_json"),
]


def test_the_inputs_that_used_to_kill_a_session_are_error_events(server):
    async def main():
        c = await connect(server)
        for raw, code in PROBES:
            await c.send_raw(raw)
            got = await c.until("error")
            assert types(got) == ["error"] and got[-1]["error"]["code"] == code, (raw[:90], got)
        err = got[-1]["error"]
        assert err["type"] == "invalid_request_error"
        await c.send_raw(PROBES[3][0])
        message = (await c.until("error"))[-1]["error"]["message"]
        assert "multiple of 8, 10 or 25" in message and "44100" in message, message
        # Still usable, still at the default format: a text turn is answered.
        await c.send("session.update", session=MANUAL)
        updated = (await c.until("session.updated"))[-1]
        assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        await c.send_text("still here")
        await c.send("response.create")
        assert (await c.until("response.done"))[-1]["response"]["status"] == "completed"
        await c.close()

    run(main())


def test_an_unforeseen_failure_fails_the_event_not_the_session():
    class Exploding(FakeEngine):
        def submit(self, request):
            if request.text == "explode":
                raise RuntimeError("a bug the protocol layer did not foresee")
            return super().submit(request)

    engine = Exploding(slots=2, answer_words=3).start()
    try:
        with running_server(engine) as srv:
            async def main():
                c = await connect(srv)
                await c.send("session.update", session=MANUAL)
                for _ in range(2):  # the second time too (logged once, counted every time)
                    await c.send_text("explode")
                    await c.send("response.create", event_id="ev-boom")
                    err = (await c.until("error"))[-1]["error"]
                    assert (err["type"], err["code"], err["event_id"]) == ("server_error", "internal_error",
                                                                           "ev-boom")
                    assert "RuntimeError" in err["message"] and "bug" not in err["message"]
                await c.send_text("fine")
                await c.send("response.create")
                assert (await c.until("response.done"))[-1]["response"]["status"] == "completed"
                await c.close()

            run(main())
            metrics = srv.app.state.metrics
            assert metrics.errors_total.get("internal_error") == 2
    finally:
        engine.stop()


# ---- fuzzing -----------------------------------------------------------------------------------
class FuzzTally:
    def __init__(self):
        self.events = self.sessions = self.lost = self.errors = 0


def fuzz_once(srv, batch: list, tally: FuzzTally) -> None:
    """One session: every message of `batch`, each followed by an answered probe."""
    async def main():
        c = await connect(srv)
        tally.sessions += 1
        try:
            for i, raw in enumerate(batch):
                await c.send_raw(raw)
                got = await answered(c, i)
                tally.events += 1
                errors = [e["error"] for e in got if e["type"] == "error"]
                tally.errors += len(errors)
                unforeseen = [e for e in errors if e["code"] == "internal_error"]
                assert not unforeseen, (raw[:300], unforeseen)
        except Exception:
            tally.lost += 1
            raise
        finally:
            await c.close()

    run(main(), timeout=120)


QUICK = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@QUICK
@given(batch=st.lists(messages(), min_size=1, max_size=12))
def test_fuzzed_events_never_end_a_session(server, batch):
    fuzz_once(server, batch, FuzzTally())


def format_updates(fmt, where: str) -> str:
    return json.dumps({"type": "session.update", "session": {"audio": {where: {"format": fmt}}}})


@QUICK
@given(batch=st.lists(st.builds(format_updates, audio_formats, st.sampled_from(["input", "output"])),
                      min_size=1, max_size=8))
def test_fuzzed_audio_formats_never_end_a_session(server, batch):
    fuzz_once(server, batch, FuzzTally())


@pytest.mark.slow
def test_ten_thousand_fuzzed_events_lose_no_session(server):
    tally = FuzzTally()

    @settings(max_examples=5000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(messages(), min_size=5, max_size=25))
    def fuzz(batch):
        if tally.events < 10_000:
            fuzz_once(server, batch, tally)

    t0 = time.perf_counter()
    fuzz()
    print(f"\nfuzz: {tally.events} events in {tally.sessions} sessions, {tally.lost} sessions lost, "
          f"{tally.errors} error events, {time.perf_counter() - t0:.0f} s")
    assert tally.events >= 10_000 and tally.lost == 0


# ---- timeouts no client state can dodge ---------------------------------------------------------
class FakeSession:
    def __init__(self):
        self.input, self.responding = None, False


def test_session_clock_deadlines():
    now = [100.0]
    clock = SessionClock(ServerSettings(idle_timeout_s=30, input_stall_timeout_s=5), now=lambda: now[0])
    s = FakeSession()
    assert clock.wait_s(s) == 30 and clock.due(s) is None
    s.input = type("Audio", (), {"in_speech": True, "pushed_at": 100.0})()
    assert clock.wait_s(s) == 5
    now[0] = 105.0
    assert clock.due(s) == "stall"
    s.input.in_speech, s.responding = False, True
    now[0] = 131.0
    assert clock.due(s) is None and clock.wait_s(s) == 1.0   # an answer is live: poll until it ends
    s.responding = False
    assert clock.due(s) == "idle"
    clock.heard()
    assert clock.due(s) is None and clock.wait_s(s) == 30


@requires_speech
def test_a_speaker_who_stalls_mid_sentence_is_answered_then_closed():
    """1.5 s of speech, then nothing (pings still answered): the speech ends after the stall
    timeout, the answer comes, and the idle timeout closes the session and frees its slot."""
    engine = FakeEngine(slots=2, answer_words=3).start()
    speech, start, _ = utterance("what is the weather like in the mountains today", lead_s=0.3, tail_s=0.0)
    half = resample(speech[: start + 24000], 16000, 24000)  # 0.3 s quiet + 1.5 s of the sentence
    try:
        with running_server(engine, idle_timeout_s=1.5, input_stall_timeout_s=1.0) as srv:
            async def main():
                c = await connect(srv)
                await stream_audio(c, half, chunk_s=0.1)
                sent = time.monotonic()
                got = await c.until("input_audio_buffer.speech_stopped", timeout=10)
                stalled = time.monotonic() - sent
                assert "input_audio_buffer.speech_started" in types(got)
                got = await c.until("response.done", timeout=10)
                assert got[-1]["response"]["status"] == "completed"
                try:
                    while True:
                        got.append(await c.recv(10))
                except Exception as exc:
                    closed = time.monotonic() - sent
                    code = getattr(getattr(exc, "rcvd", None), "code", None)
                assert got[-1]["type"] == "error" and got[-1]["error"]["code"] == "idle_timeout"
                return stalled, closed, code

            stalled, closed, code = run(main())
            assert 0.9 <= stalled < 2.5, stalled
            assert code == 1000 and closed < 5.0, (closed, code)
            deadline = time.time() + 5
            while time.time() < deadline and (srv.app.state.admission.active or engine.stats()["sessions"]):
                time.sleep(0.05)
            assert (srv.app.state.admission.active, engine.stats()["sessions"]) == (0, 0)
    finally:
        engine.stop()
