"""`omni2 serve --workers 2` as shipped: one engine process, two gateway processes on one port.

Real processes, real uvicorn, real WebSocket clients on loopback, the tiny model. The tests
run in file order on one server: global admission across the workers, then a gateway killed
(only its sessions end; it comes back), then the engine killed (every session ends with 1011,
/health/ready is 503 until it is back), then SIGTERM (no process left behind).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")
pytest.importorskip("zmq", reason="pyzmq is not installed")

from server_harness import Client, ServeProcess, served  # noqa: E402

from omni2.clients import live_load  # noqa: E402
from test_server_serve import ready  # noqa: E402

MAX_SESSIONS = 2


@pytest.fixture(scope="module")
def server():
    with served("--model", "tiny", "--device", "cpu", "--workers", "2", "--max-sessions", str(MAX_SESSIONS),
                "--max-steps", "16",
                "--gateway-share", "1",   # one connection per gateway before the next: a spread to test
                env={"OMNI2_IDLE_TIMEOUT_S": "120"}) as s:
        s.workers(timeout=120)
        yield s   # stopped on the way out unless the SIGTERM test has stopped it


def engine_pid(s: ServeProcess) -> int:
    gateways = set(s.pids().values())
    (engine,) = [p for p in s.children() if p not in gateways]
    return engine


async def open_session(s: ServeProcess) -> tuple[Client, int]:
    """A session and the worker it landed on (the one whose count rose)."""
    before = s.sessions()
    await asyncio.sleep(0.3)
    while before != (now := s.sessions()):   # settled: no session still closing
        before = now
        await asyncio.sleep(0.3)
    c = await Client.connect(s.ws)
    first = await c.recv()
    assert first["type"] == "session.created", first
    await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
    await c.until("session.updated")
    deadline = time.monotonic() + 5
    while True:
        after = s.sessions()
        risen = [w for w in after if after[w] > before.get(w, 0)]
        if risen or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    (worker,) = risen
    return c, worker


async def one_per_worker(s: ServeProcess) -> dict[int, Client]:
    """One session on each of the two workers (with --gateway-share 1 the second session goes to
    the other gateway; a health probe still open on one can shift it: then try again)."""
    placed: dict[int, Client] = {}
    for _ in range(40):
        c, worker = await open_session(s)
        if worker in placed:
            await c.close()
            await wait_for(lambda: sum(s.sessions().values()) == len(placed))
            continue
        placed[worker] = c
        if len(placed) == 2:
            return placed
    raise AssertionError(f"every session landed on worker(s) {sorted(placed)}")


async def wait_for(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def answer(c: Client) -> list[dict]:
    await c.send_text("hi")
    await c.send("response.create")
    events = await c.until("response.done", timeout=60)
    assert any(e["type"] == "response.output_audio.delta" for e in events)
    return events


async def closed_with(c: Client, timeout: float = 10.0) -> int:
    await asyncio.wait_for(c.conn.wait_closed(), timeout)
    return c.conn.close_code


def test_two_workers_answer_at_once_under_one_global_admission(server):
    async def run():
        placed = await one_per_worker(server)
        await asyncio.gather(*(answer(c) for c in placed.values()))   # both workers at once
        # each gateway's own loop lag, told apart by omni2_worker (the bench's p99 is per worker)
        lags, held = await asyncio.to_thread(live_load.worker_lag_buckets, server.port)
        assert set(lags) == {1, 2} and all(b[float("inf")] > 0 for b in lags.values()), lags
        assert held == {1: 1, 2: 1}
        # each gateway froze what it had loaded before serving (a full collection of it held its
        # event loop 57-97 ms: streaming/engine/collector.py)
        assert all(w["gc_frozen"] > 10_000 for w in server.workers().values()), server.workers()
        for _ in range(4):  # the third session is refused wherever it lands
            c = await Client.connect(server.ws)
            event = await c.recv()
            assert event["type"] == "error" and event["error"]["code"] == "server_busy", event
            assert await closed_with(c) == 1013
        body = server.wait_ready()
        assert body["sessions"] == MAX_SESSIONS and body["max_sessions"] == MAX_SESSIONS
        for c in placed.values():
            await c.close()
        await wait_for(lambda: server.wait_ready()["sessions"] == 0)

    asyncio.run(asyncio.wait_for(run(), 240))


def test_killed_gateway_loses_only_its_sessions_and_comes_back(server):
    async def run():
        placed = await one_per_worker(server)
        pids = server.pids()
        victim, survivor = sorted(placed)
        os.kill(pids[victim], signal.SIGKILL)
        assert await closed_with(placed[victim]) == 1006   # the kernel reset it: no close frame
        await answer(placed[survivor])                      # the other worker talks on
        # the engine frees the dead gateway's slot; the supervisor starts a new gateway
        server.wait_ready(timeout=30, want=lambda b: b["sessions"] == 1
                          and b["workers"].get(str(victim), {}).get("pid") not in (None, pids[victim]))
        again = await one_per_worker_with(server, placed[survivor], survivor)
        await answer(again)
        for c in (again, placed[survivor]):
            await c.close()
        await wait_for(lambda: server.wait_ready()["sessions"] == 0)

    asyncio.run(asyncio.wait_for(run(), 240))


async def one_per_worker_with(s: ServeProcess, have: Client, worker: int) -> Client:
    """A second session on the other worker than `worker` (which holds `have`)."""
    for _ in range(40):
        c, w = await open_session(s)
        if w != worker:
            return c
        await c.close()
        await wait_for(lambda: sum(s.sessions().values()) == 1)
    raise AssertionError("every session landed on one worker")


def test_killed_engine_closes_every_session_with_1011_and_comes_back(server):
    async def run():
        placed = await one_per_worker(server)
        os.kill(engine_pid(server), signal.SIGKILL)
        codes = await asyncio.gather(*(closed_with(c, 15) for c in placed.values()))
        assert codes == [1011, 1011]
        status, body = ready(server.port)
        assert status == 503, body
        c = await Client.connect(server.ws)            # refused while the engine is away
        event = await c.recv()
        assert event["type"] == "error" and event["error"]["code"] == "model_not_ready", event
        server.wait_ready(timeout=120)                 # restarted (with backoff) and loaded again
        c, _ = await open_session(server)
        await answer(c)
        await c.close()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_sigterm_stops_every_process(server):
    children = server.children()
    assert len(children) == 3, children     # the engine and two gateways
    args = open(f"/proc/{children[0]}/cmdline").read().split("\0")
    ipc_dir = os.path.dirname(args[args.index("--endpoint") + 1][len("ipc://"):])
    assert os.path.isdir(ipc_dir)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    deadline = time.time() + 5
    while any(os.path.exists(f"/proc/{p}") for p in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if os.path.exists(f"/proc/{p}")]
    assert not os.path.exists(ipc_dir)      # the engine's socket directory is gone too
