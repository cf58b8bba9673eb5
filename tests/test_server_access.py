"""Who gets in and what is left behind: auth, Origin, admission, readiness, limits, cleanup."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server, types  # noqa: E402

from omni2.server.engine_host import EngineHost  # noqa: E402

TEXT_ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}


@pytest.fixture
def engine():
    eng = FakeEngine(slots=4).start()
    yield eng
    eng.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode(), r.headers.get("content-type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("content-type")


async def refused_status(url: str, **kw) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await websockets.connect(url, open_timeout=10, **kw)
    return info.value.response.status_code


async def closed_with(c: Client) -> tuple[int, list[dict]]:
    events = []
    try:
        while True:
            events.append(await c.recv(10))
    except websockets.exceptions.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None, events


def test_health_ready_and_metrics(engine):
    with running_server(engine) as srv:
        assert get(srv.http + "/health")[:2] == (200, '{"status":"ok"}')
        status, body, _ = get(srv.http + "/health/ready")
        ready = json.loads(body)
        assert status == 200 and ready["status"] == "ready"
        assert {"model", "device", "dtype", "free_slots", "fallback"} <= set(ready)

        async def one_turn():
            c = await Client.connect(srv.ws)
            await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
            await c.send("conversation.item.create", item=TEXT_ITEM)
            await c.send("response.create")
            await c.until("response.done")
            await c.send("nonsense")
            await c.until("error")
            await c.close()

        run(one_turn())
        status, text, ctype = get(srv.http + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        for needle in ('omni2_responses_total{status="completed"} 1', "omni2_sessions_total 1",
                       'omni2_errors_total{code="unknown_event_type"} 1', "omni2_ready 1",
                       "omni2_time_to_first_audio_seconds_count 1", "omni2_engine_step_seconds_count",
                       "omni2_engine_free_slots 4", "omni2_response_real_time_factor_count 1",
                       "omni2_process_resident_bytes", "omni2_connections_open"):
            assert needle in text, needle


def test_not_ready_until_loaded(engine):
    gate = threading.Event()

    def loader():
        gate.wait(10)
        return engine, {"model": "fake", "device": "cpu", "dtype": "float32", "fallback": True}

    host = EngineHost.loading(loader)
    with running_server(engine, host=host) as srv:
        status, body, _ = get(srv.http + "/health/ready")
        assert (status, json.loads(body)["status"]) == (503, "loading")
        assert get(srv.http + "/health")[0] == 200

        async def refused():
            c = await Client.connect(srv.ws)
            code, events = await closed_with(c)
            assert code == 1013 and events[0]["error"]["code"] == "model_not_ready"

        run(refused())
        gate.set()
        assert host.wait(10)
        status, body, _ = get(srv.http + "/health/ready")
        assert status == 200 and json.loads(body)["fallback"] is True


def test_failed_load_is_reported():
    def loader():
        raise OSError("no checkpoint at /nowhere")

    host = EngineHost.loading(loader)
    host.wait(10)
    with running_server(None, host=host) as srv:
        status, body, _ = get(srv.http + "/health/ready")
        assert status == 503 and "no checkpoint at /nowhere" in json.loads(body)["error"]


def test_api_keys(engine):
    with running_server(engine, api_keys=("sekrit", "other")) as srv:
        async def main():
            assert await refused_status(srv.ws) == 401
            assert await refused_status(srv.ws, additional_headers={"Authorization": "Bearer nope"}) == 401
            c = await Client.connect(srv.ws, headers={"Authorization": "Bearer sekrit"})
            assert (await c.recv())["type"] == "session.created"
            await c.close()
            # Browsers: the key rides in a subprotocol; the server picks "realtime".
            c = await Client.connect(srv.ws, subprotocols=["realtime", "openai-insecure-api-key.other"])
            assert c.conn.subprotocol == "realtime"
            assert (await c.recv())["type"] == "session.created"
            await c.close()

        run(main())
    with running_server(engine) as srv:  # auth off: no key needed
        async def open_one():
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            await c.close()

        run(open_one())


def test_origin_allowlist(engine):
    with running_server(engine, allowed_origins=("https://app.example",)) as srv:
        async def main():
            assert await refused_status(srv.ws, origin="https://evil.example") == 403
            for kw in ({"origin": "https://app.example"}, {}):  # allowed page; non-browser client
                c = await Client.connect(srv.ws, **kw)
                assert (await c.recv())["type"] == "session.created"
                await c.close()

        run(main())


def test_admission_when_full(engine):
    with running_server(engine, max_sessions=2) as srv:
        async def main():
            a, b = await Client.connect(srv.ws), await Client.connect(srv.ws)
            for c in (a, b):
                assert (await c.recv())["type"] == "session.created"
            extra = await Client.connect(srv.ws)
            code, events = await closed_with(extra)
            assert code == 1013
            assert types(events) == ["error"] and events[0]["error"]["code"] == "server_busy"
            await a.close()
            for _ in range(100):  # the freed place is given to the next client
                if srv.app.state.admission.active < 2:
                    break
                await asyncio.sleep(0.02)
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            await c.close()
            await b.close()

        run(main())
        assert 'omni2_sessions_refused_total{reason="server_busy"} 1' in get(srv.http + "/metrics")[1]


def test_disconnect_mid_turn_frees_the_slot(engine):
    engine.answer_words = 200
    try:
        with running_server(engine) as srv:
            async def main():
                c = await Client.connect(srv.ws)
                await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
                await c.send("conversation.item.create", item=TEXT_ITEM)
                await c.send("response.create")
                await c.until("response.output_audio.delta")
                assert engine.stats()["live_turns"] == 1
                c.conn.transport.abort()  # the client vanishes: no close frame

            run(main())
            deadline = time.time() + 5
            while time.time() < deadline:
                s = engine.stats()
                if s["live_turns"] == 0 and s["sessions"] == 0 and srv.app.state.admission.active == 0:
                    break
                time.sleep(0.05)
            s = engine.stats()
            assert (s["live_turns"], s["sessions"], srv.app.state.admission.active) == (0, 0, 0)
            assert engine.cancels_total >= 1
            # The answer the disconnect cut is counted, with its own reason.
            m = srv.app.state.metrics
            assert (m.responses_total.get("cancelled"), m.cancels_total.get("client_disconnected")) == (1, 1)
            assert m.audio_out_seconds.get() > 0
    finally:
        engine.answer_words = 8


def test_idle_timeout_closes_quiet_sessions(engine):
    with running_server(engine, idle_timeout_s=0.5) as srv:
        async def main():
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            code, events = await closed_with(c)
            assert code == 1000 and events[-1]["error"]["code"] == "idle_timeout"

        run(main())


def test_messages_past_the_hard_cap_close_the_socket(engine):
    with running_server(engine, max_message_bytes=1000, hard_message_bytes=2000) as srv:
        async def main():
            c = await Client.connect(srv.ws)
            await c.recv()
            await c.send("input_audio_buffer.append", audio="A" * 1500)  # soft limit: error event
            assert (await c.until("error"))[-1]["error"]["code"] == "message_too_large"
            await c.send("input_audio_buffer.append", audio="A" * 4000)  # hard cap: 1009
            code, _ = await closed_with(c)
            assert code == 1009

        run(main())


def test_a_client_that_stops_reading_is_closed_not_buffered():
    # 10 s of noise (it does not compress) per 50 ms tick, sent unpaced: the socket backs up
    # within seconds (paced, the same happens at playback pace, only later).
    engine = FakeEngine(slots=2, chunk_s=10.0, answer_words=400, noise=True).start()
    try:
        with running_server(engine, outbound_queue_events=8, send_stall_timeout_s=0.5, output_lead_s=0) as srv:
            async def main():
                c = await Client.connect(srv.ws, max_queue=4)
                await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
                await c.send("conversation.item.create", item=TEXT_ITEM)
                await c.send("response.create")
                await asyncio.sleep(3)  # not reading
                code, _ = await closed_with(c)
                return code

            assert run(main()) == 1008
            deadline = time.time() + 5
            while time.time() < deadline and (engine.stats()["live_turns"] or engine.stats()["sessions"]):
                time.sleep(0.05)
            assert (engine.stats()["live_turns"], engine.stats()["sessions"]) == (0, 0)
            assert srv.app.state.admission.active == 0
    finally:
        engine.stop()
