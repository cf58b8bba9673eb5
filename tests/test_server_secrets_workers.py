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
import time
import urllib.request

import pytest

pytest.importorskip("zmq", reason="pyzmq is not installed")

from server_harness import Client, ServeProcess  # noqa: E402

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
    """The gateway `pid` frozen (SIGSTOP) inside the block: a connection handed to it would hang."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_secret_minted_on_one_gateway_opens_a_session_on_the_other():
    """Each way round. `--gateway-share 1`: the supervisor gives gateway 1 one connection, then
    gateway 2 one, so a session held open on gateway 1 sends the next connection to gateway 2.
    The gateway that must NOT take a connection is frozen meanwhile, so one placed there would
    hang the test instead of passing it by luck."""
    server = ServeProcess("--model", "null", "--workers", "2", "--gateway-share", "1", "--api-key", KEY,
                          "--metrics-key", METRICS_KEY)
    port = server.port

    def settled() -> dict:
        """Pids by worker once no session is open (and the last probe's connection has closed)."""
        ws = server.workers(METRICS_KEY)
        while any(w["sessions"] for w in ws.values()):
            time.sleep(0.1)
            ws = server.workers(METRICS_KEY)
        time.sleep(0.3)
        return {int(k): w["pid"] for k, w in ws.items()}

    async def connect(token: str) -> tuple[Client, dict]:
        c = await Client.connect(f"ws://127.0.0.1:{port}/v1/realtime", headers={"Authorization": f"Bearer {token}"})
        return c, await c.recv()

    async def run() -> None:
        pids = settled()
        # minted on 2, used on 1: a keeper fills gateway 1, so the POST goes to gateway 2
        keeper, _ = await connect(KEY)
        with stopped(pids[1]):
            secret = await asyncio.to_thread(mint, port)
        await keeper.close()
        await asyncio.to_thread(settled)
        with stopped(pids[2]):
            c, first = await connect(secret)
        assert first["type"] == "session.created", ("minted on 2, used on 1", first)
        await c.close()
        await asyncio.to_thread(settled)
        # minted on 1, used on 2
        with stopped(pids[2]):
            secret = await asyncio.to_thread(mint, port)
        await asyncio.sleep(0.3)
        keeper, _ = await connect(KEY)
        with stopped(pids[1]):
            c, first = await connect(secret)
        assert first["type"] == "session.created", ("minted on 1, used on 2", first)
        await c.close()
        await keeper.close()

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        server.stop()


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
