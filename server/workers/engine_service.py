"""The engine process: one Engine that owns the device, serving every gateway over ZeroMQ.

A ROUTER socket takes the gateways' DEALERs. Calls of the Engine API run inline on one asyncio
loop, in arrival order (the engine's own methods only take a lock and queue work), so a
gateway's forget stays in order with its submits as in-process. Each turn's events go back
to the gateway that submitted it, from one task per turn reading the Turn as the in-process
server does.

This process is the authority for admission: a gateway asks `admit` before accepting a
WebSocket and gets a ticket or a refusal, so `--max-sessions` holds across all workers. A
gateway silent for PEER_TIMEOUT_S (killed, hung) loses its tickets and its engine sessions,
so its slots come back; the other gateways' sessions are untouched.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import zmq
import zmq.asyncio

from . import wire

log = logging.getLogger("omni2.engine")


@dataclass
class Gateway:
    name: str
    worker: int
    pid: int
    seen: float
    load: dict = field(default_factory=dict)
    tickets: set = field(default_factory=set)
    sessions: set = field(default_factory=set)
    turns: dict = field(default_factory=dict)       # gateway's key -> engine Turn


class EngineService:
    def __init__(self, host, endpoint: str, limit: int) -> None:
        self.host = host                # server.engine_host.EngineHost (loads on its thread)
        self.endpoint = endpoint
        self._limit = limit             # sessions admitted across all gateways (0: as loaded)
        self.gateways: dict[bytes, Gateway] = {}
        self.boot = f"{os.getpid()}-{time.time_ns()}"
        self._tickets = itertools.count(1)
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def limit(self) -> int:
        return self._limit or int(self.host.info.get("max_sessions") or 0)

    @property
    def admitted(self) -> int:
        return sum(len(g.tickets) for g in self.gateways.values())

    async def run(self, stop: asyncio.Event) -> None:
        ctx = zmq.asyncio.Context()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)      # audio is never dropped on the way to a gateway
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.endpoint)
        reaper = asyncio.create_task(self._reap())
        try:
            while not stop.is_set():
                recv = asyncio.ensure_future(self._sock.recv_multipart())
                stopping = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({recv, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    stopping.cancel()
                    break
                stopping.cancel()
                ident, frame = recv.result()
                try:
                    self._handle(ident, wire.unpack(frame))
                except Exception:  # one bad message must not stop the engine for everybody
                    log.exception("bad message from gateway %r", ident)
        finally:
            reaper.cancel()
            for gw in list(self.gateways):
                self._drop(gw, "engine stopping")
            self._sock.close(0)
            ctx.term()

    # ---- messages --------------------------------------------------------------------------
    def _send(self, ident: bytes, message: dict) -> None:
        try:
            self._sock.send_multipart([ident, wire.pack(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the gateway is gone; its reaping frees what it held
            pass

    def _handle(self, ident: bytes, m: dict) -> None:
        op = m.get("op")
        gw = self.gateways.get(ident)
        if op == "hb":
            if gw is None:
                gw = self.gateways[ident] = Gateway(m["gw"], m.get("worker", 0), m.get("pid", 0), time.monotonic())
                log.info("gateway %s (pid %s) connected", gw.name, gw.pid)
            gw.seen, gw.load = time.monotonic(), m.get("load") or {}
            self._send(ident, self.status())
            return
        if gw is None:  # a call before the first heartbeat, or from a gateway already reaped
            if op == "call":
                self._send(ident, {"op": "err", "id": m["id"], "kind": "lost",
                                   "msg": "gateway unknown to the engine (reconnect)"})
            return
        gw.seen = time.monotonic()
        if op == "call":
            self._call(ident, gw, m)
        elif op in ("cancel", "release"):
            turn = gw.turns.get(m["key"])
            if turn is not None:
                turn.cancel() if op == "cancel" else turn.release()

    def _call(self, ident: bytes, gw: Gateway, m: dict) -> None:
        fn, args, call_id = m["fn"], m.get("args") or {}, m["id"]
        try:
            if fn == "admit":
                value = self._admit(gw)
            elif fn == "status":
                value = self.status()
            elif fn == "leave":
                gw.tickets.discard(args["ticket"])
                value = None
            else:
                engine = self._engine()
                if fn == "open_session":
                    value = engine.open_session()
                    gw.sessions.add(value)
                elif fn == "close_session":
                    gw.sessions.discard(args["sid"])
                    engine.close_session(args["sid"])
                    value = None
                elif fn == "forget":
                    engine.forget(args["sid"], args["turn_id"], args["part"], args["keep_steps"])
                    value = None
                elif fn == "submit":
                    value = self._submit(ident, gw, args["key"], wire.request_from_wire(args["request"]))
                else:
                    raise ValueError(f"unknown call {fn!r}")
        except Exception as exc:
            if call_id is not None:
                self._send(ident, {"op": "err", "id": call_id, **wire.error_to_wire(exc)})
            return
        if call_id is not None:
            self._send(ident, {"op": "ret", "id": call_id, "value": value})

    def _engine(self):
        if not self.host.ready:
            raise wire.EngineLost(f"the engine is {self.host.state}")
        return self.host.engine

    def _admit(self, gw: Gateway) -> Optional[int]:
        if not self.host.ready or self.admitted >= self.limit:
            return None
        ticket = next(self._tickets)
        gw.tickets.add(ticket)
        return ticket

    def _submit(self, ident: bytes, gw: Gateway, key: int, request) -> int:
        turn = self.host.engine.submit(request)
        gw.turns[key] = turn
        task = asyncio.get_running_loop().create_task(self._relay(ident, gw, key, turn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return turn.id

    async def _relay(self, ident: bytes, gw: Gateway, key: int, turn) -> None:
        try:
            async for event in turn:
                self._send(ident, {"op": "ev", "key": key, "e": wire.event_to_wire(event)})
        finally:
            gw.turns.pop(key, None)

    # ---- status and gateway loss --------------------------------------------------------------
    def status(self) -> dict:
        ready = self.host.ready
        engine = self.host.engine if ready else None
        overloaded = False
        if engine is not None and hasattr(engine, "overloaded"):
            try:
                overloaded = bool(engine.overloaded())
            except Exception:
                log.exception("engine.overloaded() failed")
        workers = {str(g.worker): {"pid": g.pid, "sessions": len(g.tickets), **g.load}
                   for g in self.gateways.values()}
        return {"op": "hb", "boot": self.boot, "state": self.host.state, "error": self.host.error,
                "info": self.host.info, "stats": self.host.stats(), "overloaded": overloaded,
                "sessions": self.admitted, "limit": self.limit, "workers": workers}

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(wire.HEARTBEAT_S)
            now = time.monotonic()
            for ident, gw in list(self.gateways.items()):
                if now - gw.seen > wire.PEER_TIMEOUT_S:
                    self._drop(ident, f"silent for {now - gw.seen:.1f} s")

    def _drop(self, ident: bytes, why: str) -> None:
        """A gateway is gone: free its slots and tickets; its turns end with their sessions."""
        gw = self.gateways.pop(ident, None)
        if gw is None:
            return
        log.log(logging.WARNING if gw.sessions else logging.INFO,
                "gateway %s (pid %s) gone (%s): closing its %d engine session(s)",
                gw.name, gw.pid, why, len(gw.sessions))
        for turn in list(gw.turns.values()):
            turn.cancel()
        if self.host.ready:
            for sid in gw.sessions:
                self.host.engine.close_session(sid)
