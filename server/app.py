"""The FastAPI application: health, metrics, and the realtime WebSocket.

`GET /v1/realtime` (also `/realtime`) speaks the OpenAI Realtime API. Before the upgrade the
connection is checked (Origin, API key: refused with 403/401); after it, a session is
admitted only while the model is ready and a slot is free (else one `error` event and close
code 1013 "try again later"). Each connection runs a reader (this handler) and a writer task
draining the session's bounded outbox.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from omni2.streaming.cpu.malloc import heap_stats

from . import events as ev
from .access import REALTIME_SUBPROTOCOL, Admission, check_access, check_operator, presented_key, wants_beta_names
from .capacity import proc_bytes
from .client_secrets import ClientSecrets
from .engine_host import EngineHost
from .guard import SessionClock
from .input_audio import DetectorFactory, detector_factory_for
from .limits import ConnectionLimiter
from .loop_lag import LoopLag
from .metrics import Metrics
from .outbox import Outbox, SlowReader
from .protocol import ProtocolError, field_of
from .session import RealtimeSession
from .session_config import EXTENSIONS_FIELD, SessionConfig
from .session_items import is_engine_full
from .settings import ServerSettings
from .transcription import Transcriber

log = logging.getLogger("omni2.server")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011           # the engine (or this gateway) failed: the session cannot go on
CLOSE_TRY_AGAIN = 1013
WRITER_FLUSH_S = 2.0          # time given to send the last events before the socket closes


def create_app(settings: ServerSettings, host: EngineHost,
               detector_factory: Optional[DetectorFactory] = None,
               static_dir: Optional[Path] = None, admission=None) -> FastAPI:
    """`admission`: server.workers' RemoteAdmission in a gateway (the engine process counts
    sessions across all workers); by default this process counts its own."""
    app = FastAPI(title="omni2 realtime", docs_url=None, redoc_url=None, openapi_url=None)
    if detector_factory is None:
        detector_factory = detector_factory_for(settings.interrupt_mode, settings.command_phrases,
                                                settings.turn_audio_tail_ms)
    metrics = Metrics()
    loop_lag = LoopLag(metrics.loop_lag)
    admission = admission or Admission(settings.max_sessions, lambda: host.info.get("max_sessions"))
    live: set = set()             # close(code, reason) of every session open in this process

    def close_all(code: int, reason: str) -> None:
        """Close every session of this process (any thread): the engine was lost, or the
        process is failing."""
        for close in list(live):
            close(code, reason)

    host.on_lost(lambda: close_all(CLOSE_INTERNAL, "engine lost"))
    transcriber = Transcriber(settings.transcription_model, settings.transcription_threads)
    client_secrets = ClientSecrets(settings.client_secret_key)
    app.state.settings, app.state.host, app.state.metrics = settings, host, metrics
    app.state.client_secrets = client_secrets
    app.state.admission = admission
    app.state.close_all = close_all
    app.state.connections = ConnectionLimiter(settings, metrics)  # used by serve.uvicorn_config

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(request: Request):
        # Probes need only the status; the details are for operators (access.check_operator).
        details = check_operator(settings, request.headers) is None
        if not host.ready:
            body = {"status": host.state}
            if host.error and details:
                body["error"] = host.error
            return JSONResponse(body, status_code=503)
        if not details:
            return {"status": "ready"}
        await admission.refresh()  # a gateway: the engine process's figures of now
        stats = host.stats() or {}
        body = {"status": "ready", **host.info, "free_slots": stats.get("free_slots"),
                "sessions": admission.active, "max_sessions": admission.limit}
        workers = admission.workers()  # gateways: each worker's sessions (and pid, connections)
        if workers is not None:
            body["workers"] = workers
        return body

    @app.get("/metrics")
    async def prometheus(request: Request):
        refusal = check_operator(settings, request.headers)
        if refusal is not None:
            return JSONResponse({"error": {"type": "invalid_request_error", "code": refusal.code,
                                           "message": refusal.message}}, status_code=refusal.status)
        if host.ready:
            await admission.refresh()
        metrics.ready.set(1 if host.ready else 0)
        metrics.sessions_active.set(admission.active)
        metrics.max_sessions.set(admission.limit)
        metrics.worker.set(admission.worker)
        workers = admission.workers()
        if workers is not None:
            metrics.absorb_workers(workers)
        metrics.absorb_memory(resident_bytes(), heap_stats())
        text = metrics.render(host.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/realtime/client_secrets")
    @app.post("/realtime/client_secrets")
    async def create_client_secret(request: Request):
        """An ephemeral key for browsers and apps (see server/client_secrets.py)."""
        refusal = check_access(settings, {k.lower(): v for k, v in request.headers.items()}, ())
        if refusal is not None:
            return error_response(refusal.status, refusal.code, refusal.message)
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "invalid_json", "The request body is not valid JSON.")
        try:
            if not isinstance(body, dict):
                raise ProtocolError("invalid_type", "The request body must be a JSON object.")
            session = field_of(body, "session", dict, "session", default={"type": "realtime"})
            cfg, _ = SessionConfig.default(settings, host.model_name).apply(session, settings)
            value, expires_at = client_secrets.mint(body.get("expires_after"), session)
        except ProtocolError as err:
            return error_response(503 if err.type == "server_error" else 400, err.code, err.message,
                                  err.type, err.param)
        return {"value": value, "expires_at": expires_at,
                "session": {**cfg.to_wire(ev.new_id("sess")), "expires_at": expires_at}}

    async def realtime(ws: WebSocket):
        loop_lag.ensure_started()
        await serve_connection(ws, settings, host, metrics, admission, detector_factory, transcriber,
                               client_secrets, live)

    app.add_api_websocket_route("/v1/realtime", realtime)
    app.add_api_websocket_route("/realtime", realtime)

    if static_dir is not None and (static_dir / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=static_dir, html=True), name="web")
    return app


def error_response(status: int, code: str, message: str, type_: str = "invalid_request_error",
                   param: Optional[str] = None) -> JSONResponse:
    """An HTTP error in the API's shape."""
    return JSONResponse({"error": {"type": type_, "code": code, "message": message, "param": param}},
                        status_code=status)


def resident_bytes() -> Optional[int]:
    """VmRSS of this process (Linux), for the memory bound in server/README.md."""
    return proc_bytes("/proc/self/status", "VmRSS")


async def _refuse_before_upgrade(ws: WebSocket, status: int, code: str, message: str) -> None:
    try:
        await ws.send_denial_response(error_response(status, code, message))
    except RuntimeError:  # server without the denial extension: plain 403
        await ws.close(code=CLOSE_POLICY, reason=message[:120])


async def _refuse_after_upgrade(ws: WebSocket, subprotocol: Optional[str], code: str, message: str) -> None:
    """Accept, say why in an error event (browsers cannot read a refused handshake), close 1013."""
    await ws.accept(subprotocol=subprotocol)
    await ws.send_json(ev.error("server_error", code, message))
    await ws.close(code=CLOSE_TRY_AGAIN, reason=message[:120])


async def serve_connection(ws: WebSocket, settings: ServerSettings, host: EngineHost,
                           metrics: Metrics, admission: Admission,
                           detector_factory: DetectorFactory, transcriber: Optional[Transcriber] = None,
                           client_secrets: Optional[ClientSecrets] = None, live: Optional[set] = None) -> None:
    offered = list(ws.scope.get("subprotocols") or [])
    headers = {k.lower(): v for k, v in ws.headers.items()}
    key = presented_key(headers, offered, settings.allow_key_in_subprotocol)
    secret_session = client_secrets.session_of(key) if client_secrets is not None else None
    refusal = check_access(settings, headers, offered, secret_ok=secret_session is not None)
    if refusal is not None:
        metrics.refused_total.inc(label=refusal.code)
        await _refuse_before_upgrade(ws, refusal.status, refusal.code, refusal.message)
        return
    subprotocol = REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None
    if not host.ready:
        metrics.refused_total.inc(label="model_loading")
        msg = {"loading": "The model is still loading.",
               "lost": "The model's process is restarting."}.get(host.state, f"The model failed to load: {host.error}")
        await _refuse_after_upgrade(ws, subprotocol, "model_not_ready", msg + " Try again later.")
        return
    overloaded = getattr(host.engine, "overloaded", None)
    if overloaded is not None and overloaded():
        # the answers playing already use the whole step budget: a new session would only wait
        metrics.refused_total.inc(label="server_busy")
        await _refuse_after_upgrade(ws, subprotocol, "server_busy", "The model is at its real-time "
                                    "capacity. Try again in a few seconds.")
        return
    ticket = await admission.enter()
    if ticket is None:
        metrics.refused_total.inc(label="server_busy")
        await _refuse_after_upgrade(ws, subprotocol, "server_busy", f"The server is at its limit of "
                                    f"{admission.limit} sessions. Try again later.")
        return
    try:
        await ws.accept(subprotocol=subprotocol)
        metrics.sessions_total.inc()
        extensions = ws.query_params.get(EXTENSIONS_FIELD, "").lower() in ("1", "true", "yes", "on")
        await _run_session(ws, settings, host, metrics, detector_factory, transcriber,
                           beta=wants_beta_names(headers, offered), extensions=extensions,
                           initial_session=secret_session, live=live)
    finally:
        admission.leave(ticket)


async def _run_session(ws: WebSocket, settings: ServerSettings, host: EngineHost, metrics: Metrics,
                       detector_factory: DetectorFactory, transcriber: Optional[Transcriber], beta: bool,
                       extensions: bool = False, initial_session: Optional[dict] = None,
                       live: Optional[set] = None) -> None:
    outbox = Outbox(settings.outbound_queue_events, settings.send_stall_timeout_s, beta_names=beta)
    reader = asyncio.current_task()
    close_reason: dict = {}

    async def on_fatal(reason: str) -> None:
        close_reason.update(code=CLOSE_POLICY, reason=reason)
        reader.cancel()

    loop = asyncio.get_running_loop()

    def close(code: int, reason: str) -> None:  # from any thread (app.close_all)
        def now() -> None:
            if not close_reason:
                close_reason.update(code=code, reason=reason)
                reader.cancel()
        loop.call_soon_threadsafe(now)

    session = RealtimeSession(engine=host.engine, settings=settings, metrics=metrics, outbox=outbox,
                              model_name=host.model_name, detector_factory=detector_factory,
                              on_fatal=on_fatal, model_fallback=bool(host.info.get("fallback")),
                              extensions=extensions, transcriber=transcriber, initial_session=initial_session)
    writer = asyncio.create_task(_write_loop(ws, outbox), name=f"writer {session.id}")
    if live is not None:
        live.add(close)
    try:
        try:
            await session.start()
        except Exception as exc:
            if not is_engine_full(exc):
                raise
            # Admission counts sessions, but the engine may hold slots for sessions still
            # closing: say so the way a full server does.
            metrics.refused_total.inc(label="server_busy")
            await session.send_error(ProtocolError("server_busy", f"No model slot is free ({exc}). "
                                                   "Try again later.", type="server_error"))
            close_reason.update(code=CLOSE_TRY_AGAIN, reason="no model slot free")
            return
        clock = SessionClock(settings)
        while True:
            try:
                message = await asyncio.wait_for(ws.receive(), clock.wait_s(session))
            except asyncio.TimeoutError:
                due = clock.due(session)
                if due == "stall":
                    await session.end_stalled_speech()
                elif due == "idle":
                    await session.send_error(ProtocolError("idle_timeout", f"No client event for "
                                                           f"{settings.idle_timeout_s:g} s; closing."))
                    close_reason.update(code=CLOSE_NORMAL, reason="idle timeout")
                    break
                continue
            if message["type"] == "websocket.disconnect":
                break
            clock.heard()
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            await session.handle(raw)
    except SlowReader as exc:
        close_reason.update(code=CLOSE_POLICY, reason=str(exc))
    except asyncio.CancelledError:
        if not close_reason:      # a real shutdown, not our own on_fatal
            raise
    except WebSocketDisconnect:
        pass
    finally:
        if live is not None:
            live.discard(close)
        await session.close()
        await outbox.close()
        try:
            await asyncio.wait_for(writer, WRITER_FLUSH_S)
        except (asyncio.TimeoutError, Exception):
            writer.cancel()
        if close_reason and ws.application_state == WebSocketState.CONNECTED:
            try:
                await asyncio.wait_for(ws.close(code=close_reason["code"],
                                                reason=close_reason["reason"][:120]), WRITER_FLUSH_S)
            except Exception:
                pass


async def _write_loop(ws: WebSocket, outbox: Outbox) -> None:
    while True:
        event = await outbox.get()
        if event is None:
            return
        try:
            await ws.send_text(outbox.encode(event))
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        outbox.sent += 1
