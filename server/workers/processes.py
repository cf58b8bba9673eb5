"""Entry points of the engine and gateway processes (`python -m omni2.server.workers ...`).

Each child reads the settings the supervisor resolved (handoff.py) and asks the kernel to
SIGTERM it when the supervisor dies, so no process outlives it.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from typing import Optional

from ..settings import ServerSettings
from .handoff import EXIT_GATEWAY_FAILED, EXIT_MODEL_FAILED, SUPERVISOR_ENV, settings_from_env

log = logging.getLogger("omni2.server")

PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """SIGTERM this process when its parent dies (Linux), and exit now if it already has."""
    parent = int(os.environ.get(SUPERVISOR_ENV, "0") or 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's shutdown still ends us
        pass
    if parent and os.getppid() != parent:
        sys.exit(0)


def _logging(settings: ServerSettings, role: str) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [{role}]: %(message)s")


# ---- the engine process -------------------------------------------------------------------------
def run_engine(endpoint: str) -> int:
    die_with_supervisor()
    settings = settings_from_env()
    _logging(settings, "engine")
    from ..engine_host import EngineHost
    from ..serve import load_engine
    from .engine_service import EngineService

    if settings.device in ("cpu", "auto"):
        from omni2.streaming.engine.runtime import pick_device

        if pick_device(settings.device) == "cpu":  # bound the heap's arenas before loading makes them
            from omni2.streaming.cpu.malloc import keep_large_allocations

            keep_large_allocations(settings.malloc_arena_max)
    failed = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if os.environ.get(SUPERVISOR_ENV):
            # Ctrl-C reaches the whole process group: the supervisor stops the gateways first
            # (their sessions close while the engine still answers), then this process.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGINT, stop.set)

        def load():
            try:
                return load_engine(settings)
            except Exception:
                if settings.model != "auto":  # nothing to serve: the supervisor stops the server
                    failed.set()
                    loop.call_soon_threadsafe(stop.set)
                raise

        host = EngineHost.loading(load)
        service = EngineService(host, endpoint, settings.max_sessions)
        try:
            await service.run(stop)
        finally:
            host.wait(0)
            host.stop()

    asyncio.run(main())
    if failed.is_set():
        return EXIT_MODEL_FAILED
    return 0


# ---- a gateway process --------------------------------------------------------------------------
def run_gateway(endpoint: str, fd: int, worker: int) -> int:
    die_with_supervisor()
    settings = settings_from_env()
    _logging(settings, f"gateway {worker}")
    import torch

    # A gateway runs no model: its torch work (VAD) is tiny calls, and N gateways share the
    # cores with the engine, so one thread each (no OpenMP team per process).
    torch.set_num_threads(1)
    if settings.interrupt_mode == "command":  # loaded now, so no session of this gateway pays for it
        from omni2.streaming.listening.interrupt import shared_recognizer

        shared_recognizer()
    from omni2.streaming.engine.collector import freeze_long_lived

    from ..app import create_app
    from ..serve import uvicorn_config, web_client_dir
    from .placement import handed_server
    from .remote_engine import EngineLink, RemoteAdmission, RemoteHost

    ctrl = socket.socket(fileno=fd)     # the control socket: connections arrive on it (placement.py)
    app_ref: dict = {}

    def load() -> dict:
        app = app_ref.get("app")
        if app is None:
            return {}
        # loop_lag: this gateway's event-loop lag histogram, so /health/ready shows every
        # gateway's (a scrape of /metrics reaches only the gateway the supervisor places it on)
        return {"connections": app.state.connections.open, "max_connections": settings.max_connections,
                "local_sessions": admission.local, "loop_lag": app.state.metrics.loop_lag.cumulative(),
                "gc_frozen": frozen}

    link = EngineLink(endpoint, worker, load)
    host = RemoteHost(link)
    admission = RemoteAdmission(link)
    app = create_app(settings, host, static_dir=web_client_dir(), admission=admission)
    app_ref["app"] = app
    # What lives now (torch, the recognizer, the app) leaves the cyclic collector's scans: a
    # full collection of it held this gateway's event loop 57-97 ms (streaming/engine/collector.py).
    frozen = freeze_long_lived()
    # the engine link (and with it this gateway's place in /health/ready) starts once the
    # supervisor can place connections here
    server = handed_server(uvicorn_config(app, settings), ctrl, on_serving=link.start)
    fatal: dict = {}
    threading.excepthook = failing(app, server, worker, fatal)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        link.stop()
    return EXIT_GATEWAY_FAILED if fatal else 0


def failing(app, server, worker: int, fatal: dict):
    """The threading.excepthook of a gateway: an uncaught error on a thread of ours (the engine
    link above all) means it cannot go on. Its sessions hear 1011 at once, the server stops a
    second later (the close frames go out), and the supervisor starts a fresh gateway."""
    from ..app import CLOSE_INTERNAL

    def hook(args: threading.ExceptHookArgs) -> None:
        log.critical("gateway %d failing: %s", worker, args.exc_value,
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        fatal["error"] = str(args.exc_value)
        app.state.close_all(CLOSE_INTERNAL, "gateway failure")
        threading.Timer(1.0, lambda: setattr(server, "should_exit", True)).start()

    return hook


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m omni2.server.workers")
    parser.add_argument("role", choices=("engine", "gateway"))
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--fd", type=int, default=-1)
    parser.add_argument("--worker", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "engine":
        return run_engine(args.endpoint)
    return run_gateway(args.endpoint, args.fd, args.worker)
