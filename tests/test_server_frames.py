"""Frames that break the WebSocket protocol itself close that socket with the RFC 6455 code
and free its session; the server goes on. A raw TCP client writes the frames (a WebSocket
library refuses to send them): a text frame that is not UTF-8 (1007), a reserved opcode (1002).
Real uvicorn on loopback, null engine.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import urllib.request

import pytest

from server_harness import fake_engine_server


@pytest.fixture(scope="module")
def server():
    with fake_engine_server(max_sessions=2) as (_, srv):
        yield srv


def upgraded(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def masked(first_byte: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    return bytes([first_byte, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code(s: socket.socket) -> int:
    """The code of the server's close frame, read past the events before it."""
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    i = data.rfind(b"\x88")
    assert i >= 0, data[-200:]
    return struct.unpack(">H", data[i + 2:i + 4])[0]


def sessions(port: int) -> int:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5).read())["sessions"]


@pytest.mark.parametrize("frame,code", [
    (masked(0x81, b'{"type": "\xff\xfe"}'), 1007),   # text frame, not UTF-8
    (masked(0x83, b"ab"), 1002),                      # reserved opcode 3
], ids=["non-utf8-text", "reserved-opcode"])  # (fixed ids: the mask is random, xdist workers must agree)
def test_protocol_breaking_frames_close_with_their_code_and_free_the_session(server, frame, code):
    s = upgraded(server.port)
    s.sendall(frame)
    assert close_code(s) == code
    s.close()
    deadline = time.monotonic() + 5
    while sessions(server.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions(server.port) == 0
    ok = upgraded(server.port)   # the server takes the next socket as usual
    ok.sendall(masked(0x81, json.dumps({"type": "session.update", "session": {}}).encode()))
    got = b""
    while b"session.updated" not in got:
        chunk = ok.recv(65536)
        assert chunk, got[-200:]
        got += chunk
    ok.close()
