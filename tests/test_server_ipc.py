"""The engine <-> gateway link in one process: EngineService over ZeroMQ, RemoteEngine on the
other end, the fake engine behind it. The Engine API must come out as server/ knows it."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("zmq", reason="pyzmq is not installed")

from fake_engine import FakeEngine  # noqa: E402

from omni2.server.engine_host import EngineHost  # noqa: E402
from omni2.server.session_items import is_engine_full  # noqa: E402
from omni2.server.workers import wire  # noqa: E402
from omni2.server.workers.engine_service import EngineService  # noqa: E402
from omni2.server.workers.remote_engine import EngineLink, RemoteAdmission, RemoteEngine, RemoteHost  # noqa: E402
from omni2.streaming.engine.messages import AudioChunk, TurnDone, TurnRequest  # noqa: E402


class ServiceThread:
    def __init__(self, engine, endpoint: str, limit: int):
        self.service = EngineService(EngineHost.ready_with(engine, {"model": "fake"}), endpoint, limit)
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()

    async def _main(self):
        self.stop_event = asyncio.Event()
        await self.service.run(self.stop_event)

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(5)


def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def rig(tmp_path):
    engine = FakeEngine(slots=2, tick_s=0.02, answer_words=4).start()
    endpoint = f"ipc://{tmp_path}/engine"
    service = ServiceThread(engine, endpoint, limit=2)
    link = EngineLink(endpoint, worker=1).start()
    until(lambda: link.alive)
    try:
        yield engine, service, link
    finally:
        link.stop()
        service.stop()
        engine.stop()


def test_turns_errors_and_cancel_cross_as_the_engine_raised_them(rig):
    fake, _, link = rig
    engine = RemoteEngine(link)
    sid = engine.open_session()
    turn = engine.submit(TurnRequest(sid, audio_16k=np.full(1600, 0.25, np.float32)))
    events = list(turn.events(timeout=5))
    assert isinstance(events[-1], TurnDone) and events[-1].reason == "completed"
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert chunks and all(c.pcm.dtype == np.float32 and c.pcm.size for c in chunks)
    assert np.array_equal(fake.submitted[-1].audio_16k, np.full(1600, 0.25, np.float32))  # raw bytes, exact
    assert turn.id == [t for t, _ in fake.context[sid]][-1]      # the engine's turn id, for forget
    with pytest.raises(ValueError, match="needs audio"):
        engine.submit(TurnRequest(sid))
    with pytest.raises(ValueError):
        engine.forget(sid, turn.id, "nonsense")
    long = engine.submit(TurnRequest(sid, text="x" * 400))
    other = engine.submit(TurnRequest(engine.open_session(), text="y" * 400))
    with pytest.raises(Exception) as full:                     # both fake slots are talking
        engine.submit(TurnRequest(engine.open_session(), text="z"))
    assert is_engine_full(full.value)
    long.cancel()
    assert list(long.events(timeout=5))[-1].reason == "cancelled"
    other.cancel()


def test_engine_busy_keeps_its_retry_hint():
    from types import SimpleNamespace

    from omni2.streaming.engine.messages import EngineBusy, EngineFull

    decision = SimpleNamespace(reason=lambda: "no headroom", retry_after_s=1.5)
    back = wire.error_from_wire(wire.error_to_wire(EngineBusy.refused(decision)))
    assert isinstance(back, EngineBusy) and is_engine_full(back)
    assert back.retry_after_s == 1.5 and "no headroom" in str(back)
    full = wire.error_from_wire(wire.error_to_wire(EngineFull("no slot")))
    assert type(full) is EngineFull and is_engine_full(full)


def test_admission_is_global_and_a_silent_gateway_gives_back_its_slots(rig, tmp_path):
    fake, service, link = rig
    admission = RemoteAdmission(link)

    async def enter():
        return await admission.enter()

    tickets = [asyncio.run(enter()) for _ in range(2)]
    assert None not in tickets
    other = EngineLink(service.service.endpoint, worker=2).start()   # a second gateway
    until(lambda: other.alive)
    assert other.call_sync("admit") is None                        # the limit is across gateways
    sid = RemoteEngine(link).open_session()
    assert sid in fake._sessions
    link.stop()                                                    # this gateway falls silent
    until(lambda: other.call_sync("admit") is not None, timeout=wire.PEER_TIMEOUT_S + 3)
    assert sid not in fake._sessions                               # its engine session was closed
    other.stop()


def test_a_lost_engine_ends_live_turns_and_tells_the_host(rig):
    _, service, link = rig
    host = RemoteHost(link)
    lost = threading.Event()
    host.on_lost(lost.set)
    assert host.ready
    engine = host.engine
    turn = engine.submit(TurnRequest(engine.open_session(), text="x" * 400))
    service.stop()
    assert lost.wait(wire.PEER_TIMEOUT_S + 3)
    done = list(turn.events(timeout=5))[-1]
    assert done.reason == "error" and "engine lost" in done.error
    assert not host.ready and host.state == "lost"
    with pytest.raises(wire.EngineLost):
        engine.open_session()


def test_close_all_ends_every_session_with_1011_from_any_thread():
    """What a gateway does when the engine is lost or the gateway itself fails."""
    from server_harness import Client, fake_engine_server

    with fake_engine_server(max_sessions=2) as (_, srv):
        async def run():
            clients = [await Client.connect(srv.ws) for _ in range(2)]
            for c in clients:
                assert (await c.recv())["type"] == "session.created"
            threading.Thread(target=srv.app.state.close_all, args=(1011, "engine lost")).start()
            for c in clients:
                await asyncio.wait_for(c.conn.wait_closed(), 10)
                assert c.conn.close_code == 1011 and c.conn.close_reason == "engine lost"

        asyncio.run(run())


def test_a_failing_gateway_closes_its_sessions_with_1011_and_stops():
    """A gateway's uncaught thread error (processes.failing, its threading.excepthook)."""
    from server_harness import Client, fake_engine_server

    from omni2.server.workers.processes import failing

    with fake_engine_server(max_sessions=2) as (_, srv):
        async def run():
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            fatal: dict = {}
            hook = failing(srv.app, srv.server, 1, fatal)
            try:
                raise RuntimeError("link thread broke")
            except RuntimeError as exc:
                hook(threading.ExceptHookArgs((RuntimeError, exc, exc.__traceback__, threading.current_thread())))
            await asyncio.wait_for(c.conn.wait_closed(), 10)
            assert c.conn.close_code == 1011 and c.conn.close_reason == "gateway failure"
            assert fatal["error"] == "link thread broke"
            await asyncio.sleep(1.5)
            assert srv.server.should_exit

        asyncio.run(run())
