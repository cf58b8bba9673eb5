"""Where `omni2 serve --workers N` puts a connection: fill one gateway up to its share, then spill.

The policy itself (`place`), a burst placed before any gateway has reported (the supervisor
counts what it handed), and the real multi-process server (null model, real WebSocket clients
on loopback): with `--gateway-share 3` and two gateways, sessions land 3 on gateway 1, then on
gateway 2, then on the least loaded. Left to the kernel (the inherited listening socket this
replaced) the spread was whatever the wake-up order gave, so these counts fail without the policy.
"""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

pytest.importorskip("zmq", reason="pyzmq is not installed")

from server_harness import Client, served  # noqa: E402

from omni2.server.workers.placement import REPORT, GatewayLink, control_pair, handed_server, place  # noqa: E402


def test_fill_then_spill_then_least_loaded():
    assert place({}, 32) is None
    assert place({1: 0, 2: 0}, 3) == 1
    assert place({1: 2, 2: 0}, 3) == 1                 # gateway 1 below its share keeps taking
    assert place({1: 3, 2: 0}, 3) == 2                 # full: the next one
    assert place({1: 3, 2: 3, 3: 1}, 3) == 3
    assert place({1: 5, 2: 3}, 3) == 2                 # all full: the least loaded
    assert place({1: 4, 2: 4}, 3) == 1                 # ties: the lowest number
    assert place({2: 0, 3: 0}, 3) == 2                 # gateway 1 not serving (restarting)


def test_share_0_spreads_evenly():
    assert place({1: 1, 2: 0}, 0) == 2
    assert place({1: 1, 2: 1}, 0) == 1
    assert place({1: 7, 2: 2, 3: 2}, 0) == 2


def test_a_burst_is_counted_before_the_gateway_reports():
    """Connections handed but not yet taken count: five in a row with share 2 go 1, 1, 2, 2, 1."""
    pairs = [control_pair() for _ in range(2)]
    links = {w + 1: GatewayLink(ours) for w, (ours, _) in enumerate(pairs)}
    for w, (_, theirs) in enumerate(pairs):
        theirs.send(REPORT.pack(0, 0))              # ready, nothing open
        assert links[w + 1].read()
    went = []
    listener = socket.create_server(("127.0.0.1", 0))
    clients = []
    try:
        for _ in range(5):
            clients.append(socket.create_connection(listener.getsockname()))
            conn, _ = listener.accept()
            with conn:
                worker = place({w: link.load for w, link in links.items() if link.ready}, 2)
                assert links[worker].hand(conn)
                went.append(worker)
        assert went == [1, 1, 2, 2, 1]
        # the gateway takes them and reports: one of gateway 1's has closed meanwhile
        _, theirs = pairs[0]
        for _ in range(3):
            _, fds, _, _ = socket.recv_fds(theirs, 16, 4)
            for fd in fds:
                os.close(fd)
        theirs.send(REPORT.pack(3, 2))
        assert links[1].read() and links[1].load == 2
        theirs.close()
        assert not links[1].read()                  # gone: the supervisor stops handing it work
    finally:
        for c in clients:
            c.close()
        listener.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_a_gateway_says_it_serves_only_after_its_first_report():
    """on_serving (where a gateway starts its engine link, and so its place in /health/ready)
    runs once, after the report that lets the supervisor place connections on it: listed
    earlier, a gateway could be shown while every connection still went elsewhere."""
    import threading

    import uvicorn

    async def app(scope, receive, send):   # never reached: no connection is handed
        raise AssertionError(scope)

    ours, theirs = control_pair()
    link = GatewayLink(ours)
    seen: list[bool] = []

    def on_serving():
        seen.append(link.read() and link.ready)   # the report is already there
        server.should_exit = True

    server = handed_server(uvicorn.Config(app, log_level="warning", lifespan="off"), theirs,
                           on_serving=on_serving)
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        thread.join(20)
        assert not thread.is_alive() and seen == [True], seen
    finally:
        ours.close()
        theirs.close()


def test_a_connection_counts_while_the_gateway_adopts_it():
    """From the hand-off until the connection is served, the gateway's reports keep counting it.
    It used to report the connection taken (at once) but not yet open (a loop turn later, when
    uvicorn's protocol adds itself): a report in between read as load 0, and a second session
    arriving then was put on the same gateway (CI: two Agents SDK sessions both on gateway 1)."""
    import threading

    import uvicorn

    async def app(scope, receive, send):
        raise AssertionError(scope)         # never reached: the client sends no request

    ours, theirs = control_pair()
    link = GatewayLink(ours)
    server = handed_server(uvicorn.Config(app, log_level="warning", lifespan="off"), theirs)
    thread = threading.Thread(target=server.run, daemon=True)
    listener = socket.create_server(("127.0.0.1", 0))
    client = None
    try:
        thread.start()
        reports = []

        def next_report(timeout: float = 10.0) -> tuple[int, int]:
            ours.settimeout(timeout)
            data = ours.recv(REPORT.size)
            reports.append(REPORT.unpack(data))
            return reports[-1]

        assert next_report() == (0, 0)                 # ready
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        with conn:
            ours.setblocking(False)
            assert link.hand(conn)
        while next_report() != (1, 1):                  # until it serves the connection
            pass
        handed = 1
        loads = [open_ + handed - taken for taken, open_ in reports[1:]]
        assert loads and min(loads) == 1, reports
    finally:
        server.should_exit = True
        thread.join(20)
        if client is not None:
            client.close()
        listener.close()
        ours.close()
        theirs.close()


def test_the_server_places_sessions_by_its_share():
    with served("--model", "null", "--workers", "2", "--gateway-share", "3") as server:
        async def run() -> None:
            assert await asyncio.to_thread(server.sessions) == {1: 0, 2: 0}
            await asyncio.sleep(0.3)                     # the probe's connection has closed

            async def session() -> Client:
                c = await Client.connect(server.ws)
                assert (await c.recv())["type"] == "session.created"
                return c

            clients = [await session() for _ in range(4)]
            assert await asyncio.to_thread(server.sessions) == {1: 3, 2: 1}
            await asyncio.sleep(0.3)
            clients += [await session() for _ in range(3)]
            assert await asyncio.to_thread(server.sessions) == {1: 4, 2: 3}     # both full: the least loaded
            for c in clients:
                await c.close()

        asyncio.run(asyncio.wait_for(run(), 120))
