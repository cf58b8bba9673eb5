"""Connection limits below the app: how many TCP connections, from whom, and for how long
before they say what they want.

uvicorn accepts every TCP connection and waits for a request as long as the peer likes: a
connection that sends nothing, half a request line, or headers without the closing blank
line is never closed, and nothing caps how many one address holds. So `omni2 serve` runs
uvicorn's own HTTP and WebSocket protocols with these additions (`guarded_protocols`):

* at most `max_connections` open connections in all and `max_connections_per_client` per
  client IP; past either, the connection gets `503` and is closed before anything is parsed;
* at most `max_request_head_bytes` received while no request is being answered (the request
  line and headers: uvicorn's parser, llhttp, has no limit of its own): past it, `431` and close;
* a request deadline of `handshake_timeout_s`, armed when the connection opens and again after
  each answer on a keep-alive connection: unless an answer is being written, the connection
  is closed when it fires. A WebSocket upgrade disarms it (the session's own idle and stall
  timeouts take over, server/guard.py); so it bounds the wait for a request line, headers,
  a body the app does not read, and the WebSocket handshake;
* each counted in `omni2_connections_open` / `omni2_connections_refused_total{reason}`.

A connection is counted from connection_made until its transport is lost, whichever protocol
(HTTP, or the WebSocket one it was upgraded to) holds it then.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from .metrics import Metrics
from .settings import ServerSettings

SERVICE_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                       b"content-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                  b"content-length: 23\r\nconnection: close\r\n\r\nrequest head too large\n")


class ConnectionLimiter:
    """Open connections by client address; the event loop's thread only (no lock needed)."""

    def __init__(self, settings: ServerSettings, metrics: Optional[Metrics] = None):
        self.limit = settings.max_connections
        self.per_client = settings.max_connections_per_client
        self.handshake_timeout_s = settings.handshake_timeout_s
        self.max_head_bytes = settings.max_request_head_bytes
        self.metrics = metrics or Metrics()
        self._open: dict[int, str] = {}          # id(transport) -> client address
        self._by_client: dict[str, int] = {}

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, transport: asyncio.BaseTransport) -> Optional[str]:
        """Count the connection in, or say why it is refused (then it is not counted)."""
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        if self.limit and len(self._open) >= self.limit:
            return self.refused("too_many_connections")
        if self.per_client and self._by_client.get(client, 0) >= self.per_client:
            return self.refused("too_many_from_client")
        self._open[id(transport)] = client
        self._by_client[client] = self._by_client.get(client, 0) + 1
        self.metrics.connections_open.set(len(self._open))
        return None

    def refused(self, reason: str) -> str:
        self.metrics.connections_refused.inc(label=reason)
        return reason

    def release(self, transport: asyncio.BaseTransport) -> None:
        """The connection is gone (idempotent: HTTP and WebSocket protocols may both call)."""
        client = self._open.pop(id(transport), None)
        if client is None:
            return
        left = self._by_client[client] - 1
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]
        self.metrics.connections_open.set(len(self._open))


def guarded_protocols(limiter: ConnectionLimiter, http_base: type, ws_base: type) -> tuple[type, type]:
    """uvicorn HTTP and WebSocket protocol classes with the limits above."""

    class GuardedHTTP(http_base):
        _deadline: Optional[asyncio.TimerHandle] = None
        _closing = False     # refused: nothing more is read
        _head = 0            # bytes received since the last answer (or the connection opened)

        def connection_made(self, transport):
            super().connection_made(transport)
            if limiter.admit(transport) is not None:
                self._refuse(SERVICE_UNAVAILABLE)
                return
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            limiter.release(self.transport)  # (a no-op for a connection never counted)
            super().connection_lost(exc)

        def data_received(self, data):
            if self._closing:
                return
            if not self._answering():
                self._head += len(data)
                if self._head > limiter.max_head_bytes:
                    limiter.refused("request_head_too_large")
                    self._refuse(HEAD_TOO_LARGE)
                    return
            super().data_received(data)

        def _refuse(self, answer: bytes):
            self._closing = True
            self._disarm()
            self.transport.write(answer)
            self.transport.close()

        def handle_websocket_upgrade(self, *args):
            self._disarm()  # the WebSocket protocol owns the connection (and its count) now
            super().handle_websocket_upgrade(*args)

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection gets the same time

        def _answering(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self):
            self._disarm()
            self._head = 0
            self._deadline = self.loop.call_later(limiter.handshake_timeout_s, self._expire)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self):
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._answering():
                self._arm()  # the app is still answering: its own work, not the client's stall
                return
            limiter.refused("handshake_timeout")
            self.transport.close()

    class GuardedWebSocket(ws_base):
        def connection_lost(self, exc):
            limiter.release(self.transport)
            super().connection_lost(exc)

    GuardedHTTP.__name__ = f"Guarded{http_base.__name__}"
    GuardedWebSocket.__name__ = f"Guarded{ws_base.__name__}"
    return GuardedHTTP, GuardedWebSocket
