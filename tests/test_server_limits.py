"""Connections below the app (server/limits.py), probed with raw sockets on loopback: half-open
connections are closed at the handshake timeout, and connections are capped per client
address and in all, WebSocket sessions included."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import Client, running_server  # noqa: E402

UPGRADE = (b"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.fixture(scope="module")
def engine():
    eng = FakeEngine(slots=4).start()
    yield eng
    eng.stop()


def raw(srv, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    if first:
        s.sendall(first)
    return s


def closed_after(s: socket.socket, limit_s: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closes `s` (reading whatever it sent), and what it sent."""
    t0, got = time.monotonic(), b""
    s.settimeout(limit_s)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        return float("inf"), got
    finally:
        s.close()
    return time.monotonic() - t0, got


@pytest.mark.parametrize("first", [b"", b"GET /v1/rea", b"GET /health HTTP/1.1\r\nHost: x\r\n", UPGRADE],
                         ids=["nothing", "half a request line", "headers without the blank line",
                              "websocket upgrade without the blank line"])
def test_half_open_connections_are_closed_at_the_handshake_timeout(engine, first):
    with running_server(engine, handshake_timeout_s=0.5) as srv:
        waited, _ = closed_after(raw(srv, first))
        assert 0.4 <= waited < 2.0, waited
        assert srv.app.state.metrics.connections_refused.get("handshake_timeout") == 1
        assert srv.app.state.connections.open == 0


def test_keep_alive_connections_get_the_same_deadline_per_request(engine):
    with running_server(engine, handshake_timeout_s=0.5) as srv:
        s = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /hea")  # then nothing: uvicorn's keep-alive timer no longer runs
        waited, _ = closed_after(s)
        assert waited < 2.0


def test_a_websocket_session_outlives_the_handshake_timeout(engine):
    with running_server(engine, handshake_timeout_s=0.3) as srv:
        async def main():
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            await asyncio.sleep(1.0)
            await c.send("nonsense")
            assert (await c.until("error"))[-1]["error"]["code"] == "unknown_event_type"
            await c.close()

        asyncio.run(asyncio.wait_for(main(), 30))


def test_connections_are_capped_per_client_address(engine):
    with running_server(engine, max_connections_per_client=3, handshake_timeout_s=30) as srv:
        held = [raw(srv) for _ in range(3)]
        waited, answer = closed_after(raw(srv))
        assert answer.startswith(b"HTTP/1.1 503") and waited < 1.0, answer
        assert srv.app.state.metrics.connections_refused.get("too_many_from_client") == 1
        held.pop().close()
        deadline = time.time() + 5
        while srv.app.state.connections.open > 2 and time.time() < deadline:
            time.sleep(0.02)
        s = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert closed_after(s)[1].startswith(b"HTTP/1.1 200")
        for s in held:
            s.close()


def test_websocket_sessions_count_against_the_total_cap_until_they_close(engine):
    with running_server(engine, max_connections=1, max_connections_per_client=0) as srv:
        async def main():
            c = await Client.connect(srv.ws)
            assert (await c.recv())["type"] == "session.created"
            assert srv.app.state.connections.open == 1
            _, answer = await asyncio.to_thread(closed_after, raw(srv))
            assert answer.startswith(b"HTTP/1.1 503"), answer
            await c.close()
            for _ in range(100):
                if srv.app.state.connections.open == 0:
                    break
                await asyncio.sleep(0.02)
            assert srv.app.state.connections.open == 0
            c = await Client.connect(srv.ws)  # the place is free again
            assert (await c.recv())["type"] == "session.created"
            await c.close()

        asyncio.run(asyncio.wait_for(main(), 30))
        assert srv.app.state.metrics.connections_refused.get("too_many_connections") == 1


def test_a_request_head_past_its_cap_is_refused(engine):
    with running_server(engine, max_request_head_bytes=4096, handshake_timeout_s=30) as srv:
        s = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(20):  # 20 KB of headers, no end: uvicorn's parser alone takes megabytes
                s.sendall(b"X-Pad-%d: " % i + b"a" * 1000 + b"\r\n")
        except OSError:
            pass  # closed while we were still sending
        waited, answer = closed_after(s)
        assert answer.startswith(b"HTTP/1.1 431") and waited < 2.0, answer
        assert srv.app.state.metrics.connections_refused.get("request_head_too_large") == 1
        # Ordinary requests and sessions are far below it.
        s = raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert closed_after(s)[1].startswith(b"HTTP/1.1 200")
