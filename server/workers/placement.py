"""Which gateway takes a new connection, and how it gets there.

The supervisor accepts every connection on the port itself and hands the accepted socket to
one gateway over that gateway's control socket (a Unix SOCK_SEQPACKET pair; the descriptor
travels as SCM_RIGHTS), the way Node's cluster module spreads connections. The gateway adopts
it into its event loop with uvicorn's own protocol, so from there on it is served exactly as if
the gateway had accepted it. Before, every gateway accepted on one inherited socket and the
kernel's wake-up order decided: on a lightly loaded host one gateway took 80 connections of 80,
on a busier one they scattered, and nobody chose.

The policy (`place`): fill, then spill. Gateways are tried in order (1, 2, ...) and the first
holding fewer than `share` connections takes it; when every gateway holds `share` or more,
the least loaded one does (ties: the lowest number). `share` 0 means always the least loaded
(an even spread). Why fill first: a gateway's listening cost is mostly per listen pass (one
batched silero call, ~0.25 ms warm but 0.7 ms when its caches went cold between passes), not
per session, so every gateway that holds sessions pays its own passes; two half-full gateways
cost more per session than one full one (server/README.md, issue 15). `share` (32 by default,
`--gateway-share`) bounds what one process's event loop and GIL carry before the next gateway
gets work; what it costs: a gateway that dies takes up to `share` sessions with it, and those
sessions share one loop's latency.

Loads are counted from both ends so a burst is placed right before any gateway has answered:
each gateway reports (connections it has taken from its control socket and adopted into its
loop, connections open now: WebSockets and HTTP alike) as soon as either changes; the
supervisor adds what it has handed but the gateway has not taken yet.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable, Optional

log = logging.getLogger("omni2.server")

REPORT = struct.Struct("!QQ")       # taken, open
RETRY_S = 0.05                      # a report that did not fit in the socket is sent again this soon
HANDOFF = b"c"                      # the one-byte message an accepted socket rides on


def place(loads: dict[int, int], share: int) -> Optional[int]:
    """The gateway (key of `loads`: ready gateways and their connections) for the next one."""
    if not loads:
        return None
    order = sorted(loads)
    if share > 0:
        for worker in order:
            if loads[worker] < share:
                return worker
    return min(order, key=lambda w: (loads[w], w))


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the gateway's end) of a gateway's control socket."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class GatewayLink:
    """The supervisor's view of one gateway's control socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.ready = False          # the gateway has reported once: its loop is serving
        self.handed = 0
        self.taken = 0
        self.open = 0

    @property
    def load(self) -> int:
        return self.open + (self.handed - self.taken)

    def read(self) -> bool:
        """Take the gateway's reports; False when it has gone (its end closed)."""
        while True:
            try:
                data = self.sock.recv(REPORT.size)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            if len(data) == REPORT.size:
                self.taken, self.open = REPORT.unpack(data)
                self.ready = True

    def hand(self, conn: socket.socket) -> bool:
        """Pass the accepted `conn` to the gateway; False if its socket would not take it."""
        try:
            socket.send_fds(self.sock, [HANDOFF], [conn.fileno()])
        except (BlockingIOError, InterruptedError, OSError):
            return False
        self.handed += 1
        return True

    def close(self) -> None:
        self.ready = False
        self.sock.close()


def handed_server(config, ctrl: socket.socket, on_serving: Callable[[], None] = lambda: None):
    """A uvicorn Server that listens on no socket of its own and serves the connections the
    supervisor hands it over `ctrl` (the gateway's end of its control socket). When the
    supervisor's end closes the gateway stops (the supervisor is gone).

    `on_serving()` runs once the server has started and its first report (which makes the
    supervisor place connections here) is sent: a gateway starts its engine link there, so
    /health/ready lists a gateway only once connections can be placed on it (started before,
    a gateway could be listed while the supervisor still placed every connection elsewhere)."""
    import uvicorn

    class HandedServer(uvicorn.Server):
        taken = 0
        _reported: Optional[tuple[int, int]] = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=[])
            loop = asyncio.get_running_loop()
            self._loop = loop
            cfg = self.config

            def protocol():
                # what uvicorn's own startup builds for each connection it accepts
                return cfg.http_protocol_class(config=cfg, server_state=self.server_state,
                                               app_state=self.lifespan.state, _loop=loop)

            self._protocol = protocol
            self._due = None
            # uvicorn's protocols add themselves to this set when a connection opens and
            # discard themselves when it closes: each change is reported at once
            self.server_state.connections = _Counted(self.server_state.connections, self._soon)
            ctrl.setblocking(False)
            loop.add_reader(ctrl.fileno(), self._receive)
            self._report()          # ready: the supervisor starts handing connections here
            on_serving()

        def _receive(self) -> None:
            while True:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 4)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    msg, fds = b"", []
                if not msg and not fds:     # the supervisor has gone
                    self._loop.remove_reader(ctrl.fileno())
                    self.should_exit = True
                    return
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    if self.should_exit:
                        conn.close()
                        self._taken()
                        continue
                    self._loop.create_task(self._adopt(conn))

        async def _adopt(self, conn: socket.socket) -> None:
            try:
                await self._loop.connect_accepted_socket(self._protocol, conn, ssl=self.config.ssl)
            except Exception:
                log.exception("could not adopt a handed connection")
                conn.close()
            finally:
                # counted taken only now, when it is counted open (uvicorn's protocol added
                # itself as it was made): counted taken at receipt, a report in between showed
                # it in neither, load 0, and the next connection came here too
                self._taken()

        def _taken(self) -> None:
            self.taken += 1
            self._soon()

        def _soon(self) -> None:
            if self._due is None:   # one report for all the changes of this loop iteration
                self._due = self._loop.call_soon(self._report)

        def _report(self) -> None:
            self._due = None
            now = (self.taken, len(self.server_state.connections))
            if now == self._reported:
                return
            try:
                ctrl.send(REPORT.pack(*now))
            except (BlockingIOError, InterruptedError):
                self._due = self._loop.call_later(RETRY_S, self._report)
                return
            except OSError:         # the supervisor has gone; _receive sees it
                return
            self._reported = now

        async def shutdown(self, sockets=None) -> None:
            loop = getattr(self, "_loop", None)
            if loop is not None:
                loop.remove_reader(ctrl.fileno())
                if self._due is not None:
                    self._due.cancel()
            await super().shutdown(sockets=sockets)

    return HandedServer(config)


class _Counted(set):
    """A set that calls `changed()` after every add or removal."""

    def __init__(self, items, changed) -> None:
        super().__init__(items)
        self._changed = changed

    def add(self, item) -> None:
        super().add(item)
        self._changed()

    def discard(self, item) -> None:
        super().discard(item)
        self._changed()

    def remove(self, item) -> None:
        super().remove(item)
        self._changed()
