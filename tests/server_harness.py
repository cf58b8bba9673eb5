"""Test helpers for the realtime server: real uvicorn on loopback, real websockets client.

`running_server(engine, **settings)` starts the app on a free 127.0.0.1 port in a thread
(same uvicorn config as `omni2 serve`); `served(*flags)` runs `omni2 serve` itself as a child
process (the multi-process server: `--workers`); `Client` wraps a `websockets` connection with
send/receive helpers that fail with the events seen so far instead of hanging.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import numpy as np
import pytest
import websockets

from omni2.server.app import create_app
from omni2.server.engine_host import EngineHost
from omni2.server.serve import uvicorn_config
from omni2.server.settings import ServerSettings

RECV_TIMEOUT_S = 20.0


class Loopback:
    """A server on 127.0.0.1:`port`: its HTTP root and its realtime endpoint."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"


class RunningServer(Loopback):
    def __init__(self, app, settings: ServerSettings):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "RunningServer":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextlib.contextmanager
def running_server(engine, host: Optional[EngineHost] = None, detector_factory=None, **overrides):
    settings = ServerSettings(**{"log_level": "warning", **overrides})
    host = host or EngineHost.ready_with(engine, {"model": "fake", "device": "cpu", "dtype": "float32",
                                                  "fallback": False})
    kwargs = {"detector_factory": detector_factory} if detector_factory else {}
    app = create_app(settings, host, **kwargs)
    srv = RunningServer(app, settings).start()
    try:
        yield srv
    finally:
        srv.stop()


class ServeProcess(Loopback):
    """`omni2 serve FLAGS --port P --no-warmup` as a child process on a free loopback port."""

    def __init__(self, *flags: str, env: Optional[dict] = None):
        from test_server_serve import free_port   # (it imports this module: not at the top)

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "omni2.clients.cli", "serve", *flags,
                                      "--port", str(self.port), "--no-warmup", "--log-level", "warning"],
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, key: Optional[str] = None, timeout: float = 90, want=None) -> dict:
        """/health/ready's body once it is ready (and `want(body)`, if given); fails with the
        server's output if it exits, or with the last status if not ready in `timeout`."""
        from test_server_serve import ready

        deadline = time.time() + timeout
        while (status := ready(self.port, key))[0] != 200 or (want is not None and not want(status[1])):
            assert self.proc.poll() is None, self.proc.stdout.read()[-2000:]
            assert time.time() < deadline, f"not ready in {timeout} s: {status}"
            time.sleep(0.1)
        return status[1]

    def workers(self, key: Optional[str] = None, count: int = 2, timeout: float = 90) -> dict:
        """/health/ready's `workers` once it is ready and lists `count` gateways."""
        return self.wait_ready(key, timeout, lambda body: len(body.get("workers", {})) >= count)["workers"]

    def sessions(self, key: Optional[str] = None) -> dict[int, int]:
        """Open sessions by gateway number."""
        return {int(w): d["sessions"] for w, d in self.workers(key).items()}

    def pids(self, key: Optional[str] = None) -> dict[int, int]:
        """Each gateway's process id, by gateway number."""
        return {int(w): d["pid"] for w, d in self.workers(key).items()}

    def children(self) -> list[int]:
        """The server's child processes (with --workers: the engine and the gateways)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        from omni2.clients.tools.gateway_bench import stop_server   # SIGTERM, then SIGKILL if it hangs

        stop_server(self.proc)


@contextlib.contextmanager
def served(*flags: str, env: Optional[dict] = None):
    """A running `omni2 serve FLAGS` child (see ServeProcess), stopped on the way out."""
    server = ServeProcess(*flags, env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def two_gateways():
    """`omni2 serve --model null --workers 2 --gateway-share 1`, ready with both gateways, for a
    test module (it starts in ~20 s on a loaded 2-core host). With share 1, two sessions open at
    once land one on each gateway."""
    pytest.importorskip("zmq", reason="pyzmq is not installed")
    with served("--model", "null", "--workers", "2", "--gateway-share", "1") as server:
        server.workers()
        yield server


def installed(module: str) -> bool:
    """Whether `module` can be imported (for a skipif that decides before any fixture starts)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def held_connections(server: ServeProcess, pids: dict[int, int]) -> dict[int, int]:
    """Open TCP connections to the server's port that each gateway process holds ({gateway:
    count}, from /proc), read without connecting: a /health/ready probe is itself a connection
    the supervisor places, and would shift where the next session goes."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == server.port:   # 01: ESTABLISHED
                    established.add(cols[9])
    held = {}
    for worker, pid in pids.items():
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        held[worker] = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in established)
    return held


@contextlib.contextmanager
def peak_connections(server: ServeProcess, every_s: float = 0.05):
    """The most client connections each gateway held at once while the block ran ({gateway: peak})."""
    pids = server.pids()
    time.sleep(0.5)                    # that probe's own connection is closed and counted out
    peak = {w: 0 for w in pids}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for w, n in held_connections(server, pids).items():
                peak[w] = max(peak[w], n)
            done.wait(every_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join(10)


@contextlib.contextmanager
def fake_engine_server(max_sessions: int = 4, settings: Optional[dict] = None, **engine):
    """(FakeEngine(**engine), its running server): the engine's recordings stay readable."""
    from fake_engine import FakeEngine

    eng = FakeEngine(**{"slots": max_sessions, **engine}).start()
    try:
        with running_server(eng, max_sessions=max_sessions, **(settings or {})) as srv:
            yield eng, srv
    finally:
        eng.stop()


@contextlib.contextmanager
def tiny_engine(max_sessions: int = 4, **config):
    """A started, warmed-up engine on the built-in tiny model (EngineConfig `config`)."""
    from omni2.streaming.engine.engine import Engine, EngineConfig
    from omni2.streaming.engine.runtime import load_runtime

    engine = Engine(load_runtime(model="tiny", device="cpu"),
                    EngineConfig(max_sessions=max_sessions, **config)).start()
    engine.warmup()
    try:
        yield engine
    finally:
        engine.stop()


def spoken_questions(questions: list[str], lead_s: float, rate: int = 24000) -> list[np.ndarray]:
    """Each question said by espeak-ng with `lead_s` of silence before and 1 s after, at `rate`."""
    from speech import resample, utterance

    return [resample(utterance(q, lead_s=lead_s, tail_s=1.0)[0], 16000, rate) for q in questions]


class Client:
    """One realtime connection; every event received is kept in `seen`."""

    def __init__(self, conn):
        self.conn = conn
        self.seen: list[dict] = []

    @classmethod
    async def connect(cls, url: str, headers: Optional[dict] = None, subprotocols=None, **kw) -> "Client":
        conn = await websockets.connect(url, additional_headers=headers, subprotocols=subprotocols,
                                        max_size=None, open_timeout=10, **kw)
        return cls(conn)

    async def send(self, type_: str, **fields) -> None:
        await self.conn.send(json.dumps({"type": type_, **fields}))

    async def send_text(self, text: str) -> None:
        """A typed user message: conversation.item.create with one input_text part."""
        await self.send("conversation.item.create", item={"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": text}]})

    async def send_raw(self, data) -> None:
        await self.conn.send(data)

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        event = json.loads(raw)
        self.seen.append(event)
        return event

    async def until(self, type_: str, timeout: float = RECV_TIMEOUT_S) -> list[dict]:
        """Events up to and including the first of `type_` (fails listing what came)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = await self.recv(max(left, 0.01))
            except asyncio.TimeoutError:
                raise AssertionError(f"no {type_} within {timeout}s; got {[e['type'] for e in got]}") from None
            got.append(event)
            if event["type"] == type_:
                return got

    async def close(self) -> None:
        await self.conn.close()


# ---- audio and images ----------------------------------------------------------------------
def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


async def stream_audio(client: Client, audio_24k: np.ndarray, chunk_s: float = 0.1,
                       pace: float = 0.0) -> None:
    """Append audio in chunks (pace > 0: sleep chunk_s*pace between chunks)."""
    n = int(24000 * chunk_s)
    for i in range(0, audio_24k.size, n):
        await client.send("input_audio_buffer.append", audio=pcm16_b64(audio_24k[i:i + n]))
        if pace:
            await asyncio.sleep(chunk_s * pace)


def png_data_url(color=(200, 30, 30), size=(32, 24)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def jpeg_data_url(color=(20, 120, 220), size=(64, 48)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]
