"""A gateway's view of the engine process: the Engine API surface over ZeroMQ.

`RemoteEngine` has the methods server/ calls on an in-process Engine (streaming/ENGINE_API.md),
so the session code runs unchanged in a gateway: open_session / submit / forget /
close_session / overloaded / stats, EngineFull and EngineBusy (with retry_after_s) and
ValueError as the engine raised them. `RemoteTurn` is a messages.Turn fed by the link thread;
cancel and release are messages to the engine.

One `EngineLink` thread per gateway owns the DEALER socket (ZeroMQ sockets are not
thread-safe): callers queue what to send and wake it through a pipe; it sends a heartbeat
with the gateway's load every HEARTBEAT_S and reads the engine's (state, capacity, stats).
When the engine's socket closes (its process died), it falls silent for PEER_TIMEOUT_S (hung)
or it comes back as a new boot, every call in
flight fails, every live turn ends with reason "error", and the host tells the app, which
closes every session of this gateway with 1011.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import zmq

from omni2.streaming.engine.messages import Turn, TurnDone, TurnRequest

from ..engine_host import EngineHost
from . import wire

log = logging.getLogger("omni2.server")

CALL_TIMEOUT_S = 10.0       # a call the engine does not answer in this long fails
FORGET_PARTS = ("all", "prompt", "answer")


class EngineLink:
    """The gateway's end of the IPC: one thread, one DEALER socket."""

    def __init__(self, endpoint: str, worker: int, load: Callable[[], dict] = dict) -> None:
        self.endpoint = endpoint
        self.worker = worker
        self.name = f"gw{worker}-{os.getpid()}"
        self._load = load
        self.status: dict = {}               # the engine's last heartbeat
        self.alive = False                   # heard from the engine within PEER_TIMEOUT_S
        self._boot: Optional[str] = None
        self._heard = 0.0
        self._calls: dict[int, Future] = {}
        self.turns: dict[int, "RemoteTurn"] = {}
        self._ids = itertools.count(1)
        self._out: "queue.SimpleQueue[dict]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.on_change: Callable[[str], None] = lambda state: None   # "up" | "lost"
        self._thread = threading.Thread(target=self._run, name="omni2-engine-link", daemon=True)

    def start(self) -> "EngineLink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._poke()
        if self._thread.ident is not None:   # (never started: the gateway stopped before serving)
            self._thread.join(5)

    # ---- called from any thread ----------------------------------------------------------------
    def send(self, message: dict) -> None:
        self._out.put(message)
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full of wake-ups already / closed
            pass

    def call(self, fn: str, args: Optional[dict] = None) -> Future:
        future: Future = Future()
        if not self.alive:
            future.set_exception(wire.EngineLost("the engine process is not reachable"))
            return future
        call_id = next(self._ids)
        with self._lock:
            self._calls[call_id] = future
        self.send({"op": "call", "id": call_id, "fn": fn, "args": args or {}})
        return future

    def call_sync(self, fn: str, args: Optional[dict] = None):
        future = self.call(fn, args)
        try:
            return future.result(CALL_TIMEOUT_S)
        except TimeoutError:
            raise wire.EngineLost(f"the engine did not answer {fn} in {CALL_TIMEOUT_S:g} s") from None

    def tell(self, fn: str, args: dict) -> None:
        """A call nobody waits for (close_session, forget): in order with the others."""
        if self.alive:
            self.send({"op": "call", "id": None, "fn": fn, "args": args})

    def next_key(self) -> int:
        return next(self._ids)

    # ---- the link thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # The engine's end closing (its process died) is seen at once, not after PEER_TIMEOUT_S.
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_hb = 0.0
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(int(wire.HEARTBEAT_S * 1000 / 2)))
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        message = self._out.get_nowait()
                    except queue.Empty:
                        break
                    sock.send(wire.pack(message))
                while sock in ready:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._handle(wire.unpack(frame))
                    except Exception:
                        log.exception("bad message from the engine")
                if monitor in ready:
                    try:
                        while monitor.recv_multipart(zmq.NOBLOCK):
                            self._lost("the engine process closed its socket")
                    except zmq.Again:
                        pass
                now = time.monotonic()
                if now - last_hb >= wire.HEARTBEAT_S:
                    last_hb = now
                    sock.send(wire.pack({"op": "hb", "gw": self.name, "worker": self.worker,
                                         "pid": os.getpid(), "load": self._safe_load()}))
                if self.alive and now - self._heard > wire.PEER_TIMEOUT_S:
                    self._lost(f"no word from the engine for {now - self._heard:.1f} s")
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            self._lost("gateway stopping")

    def _safe_load(self) -> dict:
        try:
            return self._load()
        except Exception:
            return {}

    def _handle(self, m: dict) -> None:
        op = m.get("op")
        if op == "hb":
            if self._boot is not None and m["boot"] != self._boot:
                self._lost("the engine process restarted")
            self._boot, self._heard, self.status = m["boot"], time.monotonic(), m
            if not self.alive:
                self.alive = True
                self.on_change("up")
        elif op in ("ret", "err"):
            with self._lock:
                future = self._calls.pop(m["id"], None)
            if future is not None and not future.done():
                if op == "ret":
                    future.set_result(m.get("value"))
                else:
                    future.set_exception(wire.error_from_wire(m))
        elif op == "ev":
            turn = self.turns.get(m["key"])
            if turn is not None:
                event = wire.event_from_wire(m["e"])
                if isinstance(event, TurnDone):
                    self.turns.pop(m["key"], None)
                turn._emit(event)

    def _lost(self, why: str) -> None:
        """Fail everything in flight: the engine (and every engine session) is gone."""
        was_alive, self.alive = self.alive, False
        with self._lock:
            calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(wire.EngineLost(f"engine lost: {why}"))
        turns, self.turns = self.turns, {}
        for turn in turns.values():
            if not turn.done:
                turn._emit(TurnDone(reason="error", frames_generated=0, frames_emitted=0, text="",
                                    error=f"engine lost: {why}"))
        if was_alive:
            log.error("engine process lost: %s", why)
            self.on_change("lost")


class RemoteTurn(Turn):
    """A Turn whose engine runs in another process; events arrive through the link."""

    def __init__(self, request: TurnRequest, link: EngineLink, key: int) -> None:
        super().__init__(request)
        self._link, self._key = link, key

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._cancel.set()
            self._link.send({"op": "cancel", "key": self._key})

    def release(self) -> None:
        if not self._release.is_set():
            self.started_at = time.perf_counter()
            self._release.set()
            self._link.send({"op": "release", "key": self._key})


class RemoteEngine:
    """The Engine API as server/ uses it, answered by the engine process."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link

    def open_session(self) -> str:
        return self.link.call_sync("open_session")

    def close_session(self, session_id: str) -> None:
        self.link.tell("close_session", {"sid": session_id})

    def submit(self, request: TurnRequest) -> Turn:
        key = self.link.next_key()
        turn = RemoteTurn(request, self.link, key)
        self.link.turns[key] = turn   # before the call: its first events may follow the answer at once
        try:
            turn.id = self.link.call_sync("submit", {"key": key, "request": wire.request_to_wire(request)})
        except BaseException:
            self.link.turns.pop(key, None)
            raise
        return turn

    def forget(self, session_id: str, turn_id: int, part: str = "all", keep_steps: int = 0) -> None:
        if part not in FORGET_PARTS:  # raised here as the engine would, not lost in a message
            raise ValueError(f"part must be one of {FORGET_PARTS}, got {part!r}")
        if keep_steps and part != "answer":
            raise ValueError("keep_steps applies to part='answer' only")
        self.link.tell("forget", {"sid": session_id, "turn_id": turn_id, "part": part, "keep_steps": keep_steps})

    def overloaded(self) -> bool:
        return bool(self.link.status.get("overloaded"))

    def stats(self) -> dict:
        return dict(self.link.status.get("stats") or {})

    def warmup(self) -> None:
        pass

    def stop(self) -> None:
        self.link.stop()


class RemoteHost(EngineHost):
    """EngineHost for a gateway: ready while the engine process is reachable and ready."""

    def __init__(self, link: EngineLink) -> None:
        super().__init__()
        self.link = link
        self.engine = RemoteEngine(link)
        self._listeners: set[Callable[[], None]] = set()
        link.on_change = self._changed

    def _changed(self, what: str) -> None:
        if what == "lost":
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:
                    log.exception("engine-lost listener failed")

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._listeners.add(callback)
        return lambda: self._listeners.discard(callback)

    @property
    def state(self) -> str:
        if not self.link.alive:
            return "loading" if not self.link.status else "lost"
        return self.link.status.get("state", "loading")

    @state.setter
    def state(self, value: str) -> None:  # EngineHost.__init__ sets it; the link decides
        pass

    @property
    def info(self) -> dict:
        return dict(self.link.status.get("info") or {})

    @info.setter
    def info(self, value: dict) -> None:
        pass

    @property
    def error(self) -> Optional[str]:
        if self.link.status and not self.link.alive:
            return "the engine process is not reachable (restarting)"
        return self.link.status.get("error")

    @error.setter
    def error(self, value) -> None:
        pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.ready

    def stats(self) -> Optional[dict]:
        return self.engine.stats() if self.ready else None

    def stop(self) -> None:
        self.link.stop()


class RemoteAdmission:
    """Admission decided by the engine process, so the limit holds across all gateways."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.local = 0                 # sessions of this gateway

    @property
    def worker(self) -> int:
        """This gateway's worker number (1..N)."""
        return self.link.worker

    @property
    def limit(self) -> int:
        return int(self.link.status.get("limit") or 0)

    @property
    def active(self) -> int:
        return int(self.link.status.get("sessions") or 0)

    def workers(self) -> Optional[dict]:
        """Each gateway worker's load as the engine process last heard it."""
        return dict(self.link.status.get("workers") or {})

    async def refresh(self) -> None:
        """Fresh figures for /health/ready and /metrics (heartbeats are up to HEARTBEAT_S old)."""
        try:
            status = await asyncio.wait_for(asyncio.wrap_future(self.link.call("status")), 2.0)
        except Exception:
            return
        if self.link.alive and status.get("boot") == self.link.status.get("boot"):
            self.link.status = status

    async def enter(self):
        try:
            ticket = await asyncio.wrap_future(self.link.call("admit"))
        except Exception:
            return None
        if ticket is not None:
            self.local += 1
        return ticket

    def leave(self, ticket) -> None:
        self.local = max(0, self.local - 1)
        self.link.tell("leave", {"ticket": ticket})
