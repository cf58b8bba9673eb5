"""Server events of the OpenAI Realtime API (GA names and shapes), as plain dicts.

One function per event keeps the field names in one place; the session decides when to
send them. `BETA_NAMES` renames GA events for clients that asked for the beta protocol
(`OpenAI-Beta: realtime=v1` header or `openai-beta.realtime-v1` subprotocol).
"""
from __future__ import annotations

import itertools
import os
from typing import Optional

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
