"""Memory a session leaves behind (issue 19): counts, not RSS timings.

Real uvicorn on loopback, real websockets clients, the fake engine, the real silero-vad.
"""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, fake_engine_server  # noqa: E402

from omni2.streaming.listening import vad  # noqa: E402

VAD_600 = {"type": "realtime", "audio": {"input": {"turn_detection": {
    "type": "server_vad", "silence_duration_ms": 600}}}}


async def session_that_sets_its_vad(url: str) -> None:
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    await c.send("session.update", session=VAD_600)  # a new detector replaces the default one
    await c.until("session.updated")
    await c.close()


def test_sessions_that_come_and_go_load_no_vad_network_each():
    """Each session used to load one silero module (two when it set turn_detection), ~7.5 MB
    each, and dropped them for a full gc to find; now every session of a process scores on one
    shared network (vad.shared_silero), so 12 sessions load at most that one."""
    with fake_engine_server(max_sessions=3) as (engine, srv):
        before = vad.networks_loaded()
        for _ in range(12):
            asyncio.run(asyncio.wait_for(session_that_sets_its_vad(srv.ws), 30))
        loaded = vad.networks_loaded() - before
        assert loaded <= 1, f"{loaded} silero networks loaded for 12 sessions one after another"

