"""What crosses between the engine process and the gateways, and how it is packed.

Every message is one ZeroMQ frame of msgpack: a map with an `op`. Audio and images travel as
msgpack `bin` (the array's raw float32 bytes), never as JSON or base64. The engine's
exceptions cross as a `kind` and come back out as the same classes (streaming/engine/messages.py,
which imports no torch), so server/ recognises a refusal in a gateway as in one process.
"""
from __future__ import annotations

from typing import Optional

import msgpack
import numpy as np

from omni2.streaming.engine.messages import (AudioChunk, ContextTruncated, EngineBusy, EngineFull, SamplingParams,
                                             TextDelta, TurnDone, TurnEvent, TurnRequest)

# Gateway -> engine: hb (heartbeat with the gateway's load), call (a method of the Engine API,
# answered by ret/err), cancel / release (a turn; no answer). Engine -> gateway: hb (state,
# capacity, engine stats), ret / err, ev (one event of a turn).
HEARTBEAT_S = 0.25          # both sides say they live this often
# Silence after which the other side counts as gone (hung or killed). Generous: on a loaded
# host a busy process can miss a few beats; a gateway sees the engine's death at once anyway
# (its socket closes), and the engine frees a dead gateway's slots after this long.
PEER_TIMEOUT_S = 3.0


class EngineLost(RuntimeError):
    """The engine process went away (or is not ready) while a gateway needed it."""


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def _array(a: Optional[np.ndarray]) -> Optional[bytes]:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32).tobytes()


def _from_bytes(b: Optional[bytes]) -> Optional[np.ndarray]:
    return None if b is None else np.frombuffer(b, dtype=np.float32).copy()


def request_to_wire(r: TurnRequest) -> dict:
    s = r.sampling
    return {"sid": r.session_id, "audio": _array(r.audio_16k), "image": r.image, "text": r.text,
            "sampling": [s.temperature, s.top_k, s.top_p, s.seed], "max_steps": r.max_steps,
            "hold": r.hold, "answer": r.answer, "role": r.role, "keep": r.keep}


def request_from_wire(d: dict) -> TurnRequest:
    t, k, p, seed = d["sampling"]
    return TurnRequest(session_id=d["sid"], audio_16k=_from_bytes(d["audio"]), image=d["image"], text=d["text"],
                       sampling=SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed),
                       max_steps=d["max_steps"], hold=d["hold"], answer=d["answer"], role=d["role"],
                       keep=d["keep"])


def event_to_wire(e: TurnEvent) -> dict:
    if isinstance(e, AudioChunk):
        return {"k": "audio", "pcm": _array(e.pcm), "frames": e.frames}
    if isinstance(e, TextDelta):
        return {"k": "text", "text": e.text}
    if isinstance(e, ContextTruncated):
        return {"k": "trunc", "positions": e.dropped_positions, "turns": e.dropped_turns}
    if isinstance(e, TurnDone):
        return {"k": "done", "reason": e.reason, "generated": e.frames_generated, "emitted": e.frames_emitted,
                "text": e.text, "stats": e.stats, "error": e.error}
    raise TypeError(f"not a turn event: {type(e).__name__}")


def event_from_wire(d: dict) -> TurnEvent:
    k = d["k"]
    if k == "audio":
        return AudioChunk(pcm=_from_bytes(d["pcm"]), frames=d["frames"])
    if k == "text":
        return TextDelta(d["text"])
    if k == "trunc":
        return ContextTruncated(d["positions"], d["turns"])
    return TurnDone(reason=d["reason"], frames_generated=d["generated"], frames_emitted=d["emitted"],
                    text=d["text"], stats=d["stats"] or {}, error=d["error"])


def error_to_wire(exc: BaseException) -> dict:
    """An exception raised by the engine, as the gateway will re-raise it."""
    kind = "busy" if isinstance(exc, EngineBusy) else "full" if isinstance(exc, EngineFull) else \
        "value" if isinstance(exc, ValueError) else "other"
    return {"kind": kind, "msg": str(exc), "retry": getattr(exc, "retry_after_s", None)}


def error_from_wire(d: dict) -> Exception:
    kind, msg = d["kind"], d["msg"]
    if kind == "busy":  # the reason and retry hint crossed; the Decision stayed in the engine
        return EngineBusy(msg, d.get("retry"))
    if kind == "full":
        return EngineFull(msg)
    if kind == "value":
        return ValueError(msg)
    if kind == "lost":
        return EngineLost(msg)
    return RuntimeError(msg)
