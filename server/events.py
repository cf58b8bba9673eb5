"""Server events of the OpenAI Realtime API (GA names and shapes), as plain dicts.

One function per event keeps the field names in one place; the session decides when to
send them. `to_beta` gives an event the beta protocol's name (`BETA_NAMES`) and shapes, for
clients that asked for it (`OpenAI-Beta: realtime=v1` header or `openai-beta.realtime-v1`
subprotocol).
"""
from __future__ import annotations

import itertools
import os
from typing import Optional

from omni2.streaming.audio import parse_audio_format

from .session_config import beta_format_name

_counter = itertools.count(1)
_prefix = os.urandom(4).hex()


def new_id(kind: str) -> str:
    """Unique within this process and unlikely to collide across restarts."""
    return f"{kind}_{_prefix}{next(_counter):010d}"


def event(type_: str, **fields) -> dict:
    return {"type": type_, "event_id": new_id("event"), **fields}


# ---- session -------------------------------------------------------------------------------
def session_created(session: dict) -> dict:
    return event("session.created", session=session)


def session_updated(session: dict) -> dict:
    return event("session.updated", session=session)


def error(type_: str, code: Optional[str], message: str, param: Optional[str] = None,
          event_id: Optional[str] = None) -> dict:
    return event("error", error={"type": type_, "code": code, "message": message,
                                 "param": param, "event_id": event_id})


# ---- input audio buffer --------------------------------------------------------------------
def speech_started(audio_start_ms: int, item_id: str) -> dict:
    return event("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms, item_id=item_id)


def speech_stopped(audio_end_ms: int, item_id: str) -> dict:
    return event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id)


def audio_committed(item_id: str, previous_item_id: Optional[str]) -> dict:
    return event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous_item_id)


def audio_cleared() -> dict:
    return event("input_audio_buffer.cleared")


def timeout_triggered(audio_start_ms: int, audio_end_ms: int, item_id: str) -> dict:
    return event("input_audio_buffer.timeout_triggered", audio_start_ms=audio_start_ms,
                 audio_end_ms=audio_end_ms, item_id=item_id)


# ---- conversation items ----------------------------------------------------------------------
def user_item(item_id: str, content: list[dict], role: str = "user") -> dict:
    """A message the client added (role user, or assistant / system)."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role,
            "status": "completed", "content": content}


def assistant_item(item_id: str, status: str, content: list[dict]) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": status, "content": content}


def item_added(item: dict, previous_item_id: Optional[str]) -> dict:
    return event("conversation.item.added", previous_item_id=previous_item_id, item=item)


def item_done(item: dict, previous_item_id: Optional[str]) -> dict:
    return event("conversation.item.done", previous_item_id=previous_item_id, item=item)


def item_retrieved(item: dict) -> dict:
    return event("conversation.item.retrieved", item=item)


def item_deleted(item_id: str) -> dict:
    return event("conversation.item.deleted", item_id=item_id)


def transcription_delta(item_id: str, content_index: int, delta: str) -> dict:
    return event("conversation.item.input_audio_transcription.delta", item_id=item_id,
                 content_index=content_index, delta=delta)


def transcription_completed(item_id: str, content_index: int, transcript: str, seconds: float) -> dict:
    return event("conversation.item.input_audio_transcription.completed", item_id=item_id,
                 content_index=content_index, transcript=transcript,
                 usage={"type": "duration", "seconds": round(seconds, 3)})


def transcription_failed(item_id: str, content_index: int, message: str) -> dict:
    return event("conversation.item.input_audio_transcription.failed", item_id=item_id,
                 content_index=content_index, error={"type": "server_error", "code": "transcription_failed",
                                                     "message": message, "param": None})


def context_truncated(item_ids: list[str], dropped_positions: int) -> dict:
    """omni2 extension: these items left the model's context window (they stay in the
    conversation the client sees; the model no longer remembers them)."""
    return event("conversation.context.truncated", item_ids=item_ids, dropped_positions=dropped_positions)


def item_truncated(item_id: str, content_index: int, audio_end_ms: int) -> dict:
    return event("conversation.item.truncated", item_id=item_id, content_index=content_index,
                 audio_end_ms=audio_end_ms)


# ---- responses -------------------------------------------------------------------------------
def response_object(response_id: str, status: str, output: list[dict], modalities: list[str],
                    output_format: dict, voice: str, max_output_tokens,
                    status_details: Optional[dict] = None, usage: Optional[dict] = None,
                    metadata: Optional[dict] = None, in_conversation: bool = True) -> dict:
    return {
        "id": response_id, "object": "realtime.response", "status": status,
        "status_details": status_details, "output": output,
        "conversation_id": "conv_default" if in_conversation else None,
        "output_modalities": modalities, "max_output_tokens": max_output_tokens,
        "audio": {"output": {"format": output_format, "voice": voice}},
        "usage": usage, "metadata": metadata,
    }


def response_created(response: dict) -> dict:
    return event("response.created", response=response)


def response_done(response: dict) -> dict:
    return event("response.done", response=response)


def output_item_added(response_id: str, item: dict) -> dict:
    return event("response.output_item.added", response_id=response_id, output_index=0, item=item)


def output_item_done(response_id: str, item: dict) -> dict:
    return event("response.output_item.done", response_id=response_id, output_index=0, item=item)


def _part_event(type_: str, response_id: str, item_id: str, **fields) -> dict:
    return event(type_, response_id=response_id, item_id=item_id, output_index=0,
                 content_index=0, **fields)


def content_part_added(response_id: str, item_id: str, part: dict) -> dict:
    return _part_event("response.content_part.added", response_id, item_id, part=part)


def content_part_done(response_id: str, item_id: str, part: dict) -> dict:
    return _part_event("response.content_part.done", response_id, item_id, part=part)


def audio_delta(response_id: str, item_id: str, b64: str) -> dict:
    return _part_event("response.output_audio.delta", response_id, item_id, delta=b64)


def audio_done(response_id: str, item_id: str) -> dict:
    return _part_event("response.output_audio.done", response_id, item_id)


def transcript_delta(response_id: str, item_id: str, text: str) -> dict:
    return _part_event("response.output_audio_transcript.delta", response_id, item_id, delta=text)


def transcript_done(response_id: str, item_id: str, text: str) -> dict:
    return _part_event("response.output_audio_transcript.done", response_id, item_id, transcript=text)


def text_delta(response_id: str, item_id: str, text: str) -> dict:
    return _part_event("response.output_text.delta", response_id, item_id, delta=text)


def text_done(response_id: str, item_id: str, text: str) -> dict:
    return _part_event("response.output_text.done", response_id, item_id, text=text)


# GA name -> beta name, for clients that asked for the beta protocol. GA-only events with
# no beta counterpart keep their names (beta clients ignore unknown events).
BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}

# GA content part type -> beta.
_BETA_PART_TYPES = {"output_audio": "audio", "output_text": "text"}


def _beta_format(fmt: dict):
    """The beta name of a GA format object (session_config.BETA_FORMATS); PCM at other rates
    (an omni2 extension) keeps the GA object."""
    return beta_format_name(parse_audio_format(fmt)) or fmt


def _beta_modalities(output_modalities: list[str]) -> list[str]:
    """GA ["audio"] (speech with its transcript) is beta ["text", "audio"]."""
    return ["text", "audio"] if "audio" in output_modalities else list(output_modalities)


def _beta_item(item: dict) -> dict:
    content = item.get("content")
    if not content or not any(p.get("type") in _BETA_PART_TYPES for p in content):
        return item
    return {**item, "content": [_beta_part(p) for p in content]}


def _beta_part(part: dict) -> dict:
    kind = _BETA_PART_TYPES.get(part.get("type"))
    return {**part, "type": kind} if kind else part


def _beta_session(s: dict) -> dict:
    """The GA session object plus the beta flat fields a beta client reads."""
    a_in, a_out = s["audio"]["input"], s["audio"]["output"]
    return {**s, "modalities": _beta_modalities(s["output_modalities"]),
            "input_audio_format": _beta_format(a_in["format"]),
            "output_audio_format": _beta_format(a_out["format"]),
            "input_audio_transcription": a_in["transcription"],
            "input_audio_noise_reduction": a_in["noise_reduction"],
            "turn_detection": a_in["turn_detection"], "voice": a_out["voice"],
            "speed": a_out.get("speed"), "max_response_output_tokens": s["max_output_tokens"]}


def _beta_response(r: dict) -> dict:
    out = r["audio"]["output"]
    return {**r, "output": [_beta_item(i) for i in r["output"]],
            "modalities": _beta_modalities(r["output_modalities"]),
            "output_audio_format": _beta_format(out["format"]), "voice": out["voice"]}


def to_beta(event: dict) -> dict:
    """The event as the beta protocol has it: its beta name, the session object with the
    beta flat fields added, content parts typed `audio` / `text`. A new dict; `event` (still
    queued, matched by its GA type) is not changed."""
    event = {**event, "type": BETA_NAMES.get(event["type"], event["type"])}
    if "session" in event and "audio" in event["session"]:
        event["session"] = _beta_session(event["session"])
    if "response" in event and "output" in event["response"]:
        event["response"] = _beta_response(event["response"])
    if "item" in event:
        event["item"] = _beta_item(event["item"])
    if "part" in event:
        event["part"] = _beta_part(event["part"])
    return event
