"""An ephemeral client secret opens sessions on every gateway of `omni2 serve --workers 2`.

A secret is minted by whichever gateway takes the POST and used on whichever takes the
WebSocket. Secrets kept in one gateway's memory were unknown to the other: about half the
handshakes with a fresh secret got 401 (the web page trades its key for such a secret). They
are now signed with one key per server, which every gateway checks. The real multi-process
server (null model), real HTTP and WebSocket clients on loopback; the token's own checks
(tampering, expiry, another server's key) run in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("zmq", reason="pyzmq is not installed")

from server_harness import Client  # noqa: E402
from test_server_serve import free_port, ready  # noqa: E402

from omni2.server.client_secrets import ClientSecrets  # noqa: E402

KEY, METRICS_KEY = "api-key", "metrics-key"


def mint(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/realtime/client_secrets", data=b"{}",
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["value"]


@contextlib.contextmanager
def stopped(pid: int):
    """The gateway `pid` frozen (SIGSTOP) inside the block: the other one accepts everything."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_secret_minted_on_one_gateway_opens_a_session_on_the_other():
    """Each way round: the secret is minted while only one gateway can accept, and used while
    only the other can. (Left alone, the inherited socket may give every connection to one
    gateway: 80 in a row went to the same one on a loaded machine.)"""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "omni2.clients.cli", "serve", "--model", "null",
                             "--workers", "2", "--port", str(port), "--api-key", KEY, "--metrics-key", METRICS_KEY,
                             "--no-warmup", "--log-level", "warning"],
                            env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while (status := ready(port, METRICS_KEY))[0] != 200 or len(status[1].get("workers", {})) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:] if proc.poll() else ""
            time.sleep(0.1)
        a, b = (w["pid"] for w in status[1]["workers"].values())

        async def session(secret: str) -> dict:
            c = await Client.connect(f"ws://127.0.0.1:{port}/v1/realtime",
                                     headers={"Authorization": f"Bearer {secret}"})
            first = await c.recv()
            await c.close()
            return first

        for minter, user in ((a, b), (b, a)):
            with stopped(user):
                secret = mint(port)
            with stopped(minter):
                first = asyncio.run(asyncio.wait_for(session(secret), 30))
            assert first["type"] == "session.created", (minter, user, first)
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_secret_is_checked_not_looked_up():
    now = [1000.0]
    a = ClientSecrets(key="k1", clock=lambda: now[0])
    value, expires_at = a.mint({"anchor": "created_at", "seconds": 60}, {"type": "realtime", "instructions": "x"})
    assert expires_at == 1060 and value.startswith("ek_")
    assert ClientSecrets(key="k1", clock=lambda: now[0]).session_of(value) == {"type": "realtime", "instructions": "x"}
    assert ClientSecrets(key="k2", clock=lambda: now[0]).session_of(value) is None      # another server
    body, sig = value.rsplit(".", 1)
    assert a.session_of(body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + sig) is None   # tampered
    assert a.session_of(value + "x") is None and a.session_of("ek_") is None and a.session_of("sk-x") is None
    now[0] = 1060.0
    assert a.session_of(value) is None                                                   # expired
