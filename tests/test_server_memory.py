"""Memory a session leaves behind (issue 19): counts, not RSS timings.

Real uvicorn on loopback, real websockets clients, the fake engine, the real silero-vad.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from server_harness import Client, fake_engine_server, stream_audio  # noqa: E402

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



def _live(type_names: set[str]) -> dict[str, int]:
    """Objects of these classes the cycle collector tracks, reachable or not (gc disabled:
    what only a collection would free is still listed)."""
    import gc

    counts = dict.fromkeys(type_names, 0)
    for o in gc.get_objects():
        name = type(o).__name__
        if name in counts:
            counts[name] += 1
    return counts


async def talk_and_leave(url: str, turns: int) -> None:
    """Spoken turns (committed audio) and a typed one, each answered, then the client leaves."""
    c = await Client.connect(url)
    assert (await c.recv())["type"] == "session.created"
    for _ in range(turns):
        await stream_audio(c, np.full(24000, 0.1, np.float32))  # 1 s, committed by hand
        await c.send("input_audio_buffer.commit")
        await c.send("response.create")
        await c.until("response.done")
    await c.send_text("and now in words")
    await c.send("response.create")
    await c.until("response.done")
    await c.close()


def test_a_closed_session_is_freed_without_the_cycle_collector():
    """A session that closed must go by reference counting: its answers, engine turns and the
    question audio they hold are freed when the client leaves. Held by reference cycles, they
    waited for Python's full collection, which a busy server runs every few minutes: in
    `omni2 bench soak` (16 sessions, a reconnect every 8 turns) the C heap in use rose by ~70 MB
    between two of them, and RSS kept that high-water mark (issue 19)."""
    import gc
    import time

    # (not TurnRequest: the null engine records every request it was given)
    kinds = {"RealtimeSession", "ResponseRun", "Turn", "AudioPacer", "Conversation", "InputAudio", "Outbox"}
    with fake_engine_server(max_sessions=2) as (engine, srv):
        asyncio.run(asyncio.wait_for(talk_and_leave(srv.ws, 1), 30))  # imports, first-use caches
        gc.collect()
        gc.disable()
        try:
            before = _live(kinds)
            asyncio.run(asyncio.wait_for(talk_and_leave(srv.ws, 3), 30))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the server closes its side after the client
                left = {k: n - before[k] for k, n in _live(kinds).items() if n > before[k]}
                if not left:
                    break
                time.sleep(0.1)
        finally:
            gc.enable()
            gc.collect()
    assert not left, f"left for the cycle collector after the session closed: {left}"
