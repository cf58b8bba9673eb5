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
import subprocess
import sys
import time

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")
pytest.importorskip("zmq", reason="pyzmq is not installed")

from server_harness import Client  # noqa: E402

from omni2.clients import live_load  # noqa: E402
from test_server_serve import free_port, ready  # noqa: E402

MAX_SESSIONS = 2


class Served:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "omni2.clients.cli", "serve", "--model", "tiny", "--device", "cpu",
             "--workers", "2", "--max-sessions", str(MAX_SESSIONS), "--max-steps", "16", "--no-warmup",
             "--gateway-share", "1",   # one connection per gateway before the next: a spread to test
             "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, "OMNI2_IDLE_TIMEOUT_S": "120"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def wait_ready(self, timeout: float = 120, want=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            status, body = ready(self.port)
            if status == 200 and (want is None or want(body)):
                return body
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout} s: {ready(self.port)}")

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def engine_pid(self) -> int:
        gateways = {w["pid"] for w in self.wait_ready()["workers"].values()}
        (engine,) = [p for p in self.children() if p not in gateways]
        return engine

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read()[-3000:]


@pytest.fixture(scope="module")
def served():
    s = Served()
    try:
        s.wait_ready()
        yield s
    finally:
        if s.proc.poll() is None:   # a test failed before the SIGTERM test: stop it cleanly
            s.proc.terminate()
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(10)


def sessions_by_worker(s: Served) -> dict[str, int]:
    return {w: d["sessions"] for w, d in s.wait_ready()["workers"].items()}


async def open_session(s: Served) -> tuple[Client, str]:
    """A session and the worker it landed on (the one whose count rose)."""
    before = sessions_by_worker(s)
    await asyncio.sleep(0.3)
    while before != (now := sessions_by_worker(s)):   # settled: no session still closing
        before = now
        await asyncio.sleep(0.3)
    c = await Client.connect(s.url)
    first = await c.recv()
    assert first["type"] == "session.created", first
    await c.send("session.update", session={"audio": {"input": {"turn_detection": None}}})
    await c.until("session.updated")
    deadline = time.monotonic() + 5
    while True:
        after = sessions_by_worker(s)
        risen = [w for w in after if after[w] > before.get(w, 0)]
        if risen or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    (worker,) = risen
    return c, worker


async def one_per_worker(s: Served) -> dict[str, Client]:
    """One session on each of the two workers (with --gateway-share 1 the second session goes to
    the other gateway; a health probe still open on one can shift it: then try again)."""
    placed: dict[str, Client] = {}
    for _ in range(40):
        c, worker = await open_session(s)
        if worker in placed:
            await c.close()
            await wait_for(lambda: sum(sessions_by_worker(s).values()) == len(placed))
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


def test_two_workers_answer_at_once_under_one_global_admission(served):
    async def run():
        placed = await one_per_worker(served)
        await asyncio.gather(*(answer(c) for c in placed.values()))   # both workers at once
        # each gateway's own loop lag, told apart by omni2_worker (the bench's p99 is per worker)
        lags, held = await asyncio.to_thread(live_load.worker_lag_buckets, served.port)
        assert set(lags) == {1, 2} and all(b[float("inf")] > 0 for b in lags.values()), lags
        assert held == {1: 1, 2: 1}
        for _ in range(4):  # the third session is refused wherever it lands
            c = await Client.connect(served.url)
            event = await c.recv()
            assert event["type"] == "error" and event["error"]["code"] == "server_busy", event
            assert await closed_with(c) == 1013
        body = served.wait_ready()
        assert body["sessions"] == MAX_SESSIONS and body["max_sessions"] == MAX_SESSIONS
        for c in placed.values():
            await c.close()
        await wait_for(lambda: served.wait_ready()["sessions"] == 0)

    asyncio.run(asyncio.wait_for(run(), 240))


def test_killed_gateway_loses_only_its_sessions_and_comes_back(served):
    async def run():
        placed = await one_per_worker(served)
        workers = served.wait_ready()["workers"]
        victim, survivor = sorted(placed)
        os.kill(workers[victim]["pid"], signal.SIGKILL)
        assert await closed_with(placed[victim]) == 1006   # the kernel reset it: no close frame
        await answer(placed[survivor])                      # the other worker talks on
        # the engine frees the dead gateway's slot; the supervisor starts a new gateway
        served.wait_ready(30, lambda b: b["sessions"] == 1 and b["workers"].get(victim, {}).get("pid")
                          not in (None, workers[victim]["pid"]))
        again = await one_per_worker_with(served, placed[survivor], survivor)
        await answer(again)
        for c in (again, placed[survivor]):
            await c.close()
        await wait_for(lambda: served.wait_ready()["sessions"] == 0)

    asyncio.run(asyncio.wait_for(run(), 240))


async def one_per_worker_with(s: Served, have: Client, worker: str) -> Client:
    """A second session on the other worker than `worker` (which holds `have`)."""
    for _ in range(40):
        c, w = await open_session(s)
        if w != worker:
            return c
        await c.close()
        await wait_for(lambda: sum(sessions_by_worker(s).values()) == 1)
    raise AssertionError("every session landed on one worker")


def test_killed_engine_closes_every_session_with_1011_and_comes_back(served):
    async def run():
        placed = await one_per_worker(served)
        os.kill(served.engine_pid(), signal.SIGKILL)
        codes = await asyncio.gather(*(closed_with(c, 15) for c in placed.values()))
        assert codes == [1011, 1011]
        status, body = ready(served.port)
        assert status == 503, body
        c = await Client.connect(served.url)          # refused while the engine is away
        event = await c.recv()
        assert event["type"] == "error" and event["error"]["code"] == "model_not_ready", event
        served.wait_ready(120)                         # restarted (with backoff) and loaded again
        c, _ = await open_session(served)
        await answer(c)
        await c.close()

    asyncio.run(asyncio.wait_for(run(), 240))


def test_sigterm_stops_every_process(served):
    children = served.children()
    assert len(children) == 3, children     # the engine and two gateways
    args = open(f"/proc/{children[0]}/cmdline").read().split("\0")
    ipc_dir = os.path.dirname(args[args.index("--endpoint") + 1][len("ipc://"):])
    assert os.path.isdir(ipc_dir)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    deadline = time.time() + 5
    while any(os.path.exists(f"/proc/{p}") for p in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if os.path.exists(f"/proc/{p}")]
    assert not os.path.exists(ipc_dir)      # the engine's socket directory is gone too
