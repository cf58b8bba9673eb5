"""Client events of the OpenAI Realtime API: parse, validate, and turn into plain records.

Every way a client message can be wrong maps to a `ProtocolError` carrying the fields of
the API's `error` event (type, code, message, param, event_id), so the session answers it
and goes on. GA shapes are primary; the beta shapes that clients still send (flat
`input_audio_format`, `turn_detection`, `voice`, `modalities`, `temperature` in
session.update) are accepted too. Session configuration lives in `server/session_config.py`.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Optional

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# Magic numbers of the image encodings the vision encoder reads.
_IMAGE_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


class ProtocolError(Exception):
    """A client event the server refuses; becomes one `error` event, the session goes on."""

    def __init__(self, code: str, message: str, param: Optional[str] = None,
                 event_id: Optional[str] = None, type: str = INVALID_REQUEST):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.type = type


# ---- field helpers -----------------------------------------------------------------------
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "an array"}


def field_of(obj: dict, key: str, kind, param: str, required: bool = False, default=None):
    """obj[key] checked against `kind` (a type or tuple); `param` names it in errors."""
    if key not in obj or obj[key] is None:
        if required:
            raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
        return default
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON numbers: an int is a valid float; a bool is never a number.
    ok = any(
        (isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)))
        or (k is float and isinstance(value, int) and not isinstance(value, bool))
        for k in kinds
    )
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise ProtocolError("invalid_type", f"Invalid type for '{param}': expected {want}, "
                            f"got {type(value).__name__}.", param)
    return float(value) if kinds == (float,) else value


def decode_base64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"'{param}' is not valid base64.", param) from None


def image_kind(data: bytes) -> Optional[str]:
    for magic, mime in _IMAGE_MAGIC.items():
        if data.startswith(magic):
            return mime
    return None


def decode_image_url(url: str, param: str, max_bytes: int) -> bytes:
    """JPEG/PNG bytes from a data URL (`data:image/jpeg;base64,...`) or bare base64."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ProtocolError("invalid_image", "Image data URL must be base64 "
                                "('data:image/jpeg;base64,...').", param)
    elif url.startswith(("http://", "https://")):
        raise ProtocolError("invalid_image", "Image URLs are not fetched: send the image "
                            "inline as a data URL.", param)
    else:
        payload = url
    data = decode_base64(payload, param)
    if len(data) > max_bytes:
        raise ProtocolError("image_too_large", f"Image is {len(data)} bytes; the limit is "
                            f"{max_bytes}.", param)
    if image_kind(data) is None:
        raise ProtocolError("invalid_image", "Image must be JPEG or PNG.", param)
    return data


def verify_image(data: bytes, max_pixels: int, param: str) -> None:
    """Decode the image fully (PIL) so a corrupt one is refused at the door, not mid-turn.

    Runs in a worker thread; the pixel cap is checked from the header before decoding.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ProtocolError("image_too_large", f"Image is {w}x{h} pixels; the limit is "
                                    f"{max_pixels} pixels.", param)
            img.load()
    except ProtocolError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ProtocolError("invalid_image", f"Image cannot be decoded: {exc}.", param) from None


# ---- parsed client events ------------------------------------------------------------------
@dataclass
class ClientEvent:
    type: str
    event_id: Optional[str]


@dataclass
class SessionUpdate(ClientEvent):
    session: dict


@dataclass
class AudioAppend(ClientEvent):
    audio: bytes


@dataclass
class AudioCommit(ClientEvent):
    pass


@dataclass
class AudioClear(ClientEvent):
    pass


@dataclass
class UserPart:
    kind: str                      # "text" | "audio" | "image"
    text: Optional[str] = None
    data: Optional[bytes] = None   # audio in the session's input format, or image bytes
    param: Optional[str] = None    # where it was in the event, for error messages
    wire_type: str = ""            # the part's type as the client sent it


@dataclass
class NewItem:
    """A message item the client adds: user parts (text, audio, image), or the text of an
    assistant or system message; `reference` names an existing item instead (response.input)."""

    role: str
    item_id: Optional[str] = None
    parts: list[UserPart] = field(default_factory=list)
    reference: Optional[str] = None

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if p.kind == "text" and p.text)


@dataclass
class ItemCreate(ClientEvent):
    item: NewItem
    previous_item_id: Optional[str] = None

    @property
    def item_id(self) -> Optional[str]:
        return self.item.item_id

    @property
    def parts(self) -> list[UserPart]:
        return self.item.parts


@dataclass
class ItemRetrieve(ClientEvent):
    item_id: str


@dataclass
class ItemDelete(ClientEvent):
    item_id: str


@dataclass
class ResponseCreate(ClientEvent):
    max_output_tokens: Optional[int] = None
    output_modalities: Optional[list[str]] = None
    conversation: str = "auto"
    input: Optional[list[NewItem]] = None       # its own context (out-of-band)
    metadata: Optional[dict] = None             # echoed in response.created / response.done

    @property
    def out_of_band(self) -> bool:
        return self.conversation == "none" or self.input is not None


@dataclass
class ResponseCancel(ClientEvent):
    response_id: Optional[str] = None


@dataclass
class ItemTruncate(ClientEvent):
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass
class ImageAppend(ClientEvent):
    image: bytes
    param: str = "image"


# Client events the API defines but this server cannot honour.
UNSUPPORTED = {
    "output_audio_buffer.clear": "output_audio_buffer.clear is WebRTC-only; use response.cancel",
    "transcription_session.update": "transcription-only sessions are not offered",
}


def _no_constant(name: str):
    # Python's json reads NaN and +-Infinity, which JSON does not have: refuse them at the door.
    raise ValueError(f"{name} is not a JSON value")


def parse_message(raw: str | bytes, max_bytes: int, max_image_bytes: int) -> ClientEvent:
    """One WebSocket message -> one validated client event, or ProtocolError."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError("message_too_large", f"Message is {size} bytes; the limit is {max_bytes}.")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid_json", "Binary messages must be UTF-8 JSON text.") from None
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, and also an integer literal over Python's 4300-digit
        # limit; RecursionError: nesting deeper than the parser's stack.
        raise ProtocolError("invalid_json", f"Message is not valid JSON: {str(exc)[:200]}.") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_event", "A client event must be a JSON object.")
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
    try:
        etype = field_of(obj, "type", str, "type", required=True)
        return _parse_event(etype, event_id, obj, max_image_bytes)
    except ProtocolError as err:
        err.event_id = event_id
        raise


def _parse_event(etype: str, event_id: Optional[str], obj: dict, max_image_bytes: int) -> ClientEvent:
    if etype == "session.update":
        return SessionUpdate(etype, event_id, field_of(obj, "session", dict, "session", required=True))
    if etype == "input_audio_buffer.append":
        audio = field_of(obj, "audio", str, "audio", required=True)
        return AudioAppend(etype, event_id, decode_base64(audio, "audio"))
    if etype == "input_audio_buffer.commit":
        return AudioCommit(etype, event_id)
    if etype == "input_audio_buffer.clear":
        return AudioClear(etype, event_id)
    if etype == "conversation.item.create":
        return _parse_item_create(etype, event_id, obj, max_image_bytes)
    if etype == "response.create":
        return _parse_response_create(etype, event_id, obj, max_image_bytes)
    if etype == "response.cancel":
        return ResponseCancel(etype, event_id, field_of(obj, "response_id", str, "response_id"))
    if etype == "conversation.item.truncate":
        item_id = field_of(obj, "item_id", str, "item_id", required=True)
        content_index = field_of(obj, "content_index", int, "content_index", default=0)
        audio_end_ms = field_of(obj, "audio_end_ms", int, "audio_end_ms", required=True)
        if audio_end_ms < 0 or content_index < 0:
            raise ProtocolError("invalid_value", "audio_end_ms and content_index must be >= 0.",
                                "audio_end_ms" if audio_end_ms < 0 else "content_index")
        return ItemTruncate(etype, event_id, item_id, content_index, audio_end_ms)
    if etype in ("conversation.item.retrieve", "conversation.item.delete"):
        item_id = field_of(obj, "item_id", str, "item_id", required=True)
        return (ItemRetrieve if etype.endswith("retrieve") else ItemDelete)(etype, event_id, item_id)
    if etype == "input_image_buffer.append":
        key = "image" if "image" in obj else "image_url"
        url = field_of(obj, key, str, key, required=True)
        return ImageAppend(etype, event_id, decode_image_url(url, key, max_image_bytes), key)
    if etype in UNSUPPORTED:
        raise ProtocolError("unsupported_event", f"'{etype}' is not supported: {UNSUPPORTED[etype]}.", "type")
    raise ProtocolError("unknown_event_type", f"Unknown event type '{etype}'.", "type")


def _parse_item_create(etype: str, event_id: Optional[str], obj: dict, max_image_bytes: int) -> ItemCreate:
    item = field_of(obj, "item", dict, "item", required=True)
    previous = field_of(obj, "previous_item_id", str, "previous_item_id")
    return ItemCreate(etype, event_id, parse_item(item, "item", max_image_bytes), previous)


# content part types each role may hold (GA names, and the beta "text" / "audio")
_PART_TYPES = {
    "user": ("input_text", "text", "input_audio", "input_image"),
    "assistant": ("output_text", "text", "output_audio", "audio"),
    "system": ("input_text", "text"),
}


def parse_item(item: dict, where: str, max_image_bytes: int, references: bool = False) -> NewItem:
    """A message item (or, in response.input, an item_reference) -> NewItem."""
    item_type = field_of(item, "type", str, f"{where}.type", default="message")
    if item_type == "item_reference" and references:
        return NewItem("reference", reference=field_of(item, "id", str, f"{where}.id", required=True))
    if item_type != "message":
        raise ProtocolError("unsupported_item_type", f"Item type '{item_type}' is not supported: "
                            "only messages (the model has no tools).", f"{where}.type")
    role = field_of(item, "role", str, f"{where}.role", required=True)
    if role not in _PART_TYPES:
        raise ProtocolError("invalid_value", f"Unknown role '{role}' (user, assistant, system).",
                            f"{where}.role")
    content = field_of(item, "content", list, f"{where}.content", required=True)
    if not content and role == "user":
        raise ProtocolError("invalid_value", f"{where}.content must not be empty.", f"{where}.content")
    parts = [_parse_part(part, f"{where}.content[{i}]", role, max_image_bytes) for i, part in enumerate(content)]
    return NewItem(role, field_of(item, "id", str, f"{where}.id"), parts)


def _parse_part(part, where: str, role: str, max_image_bytes: int) -> UserPart:
    if not isinstance(part, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object.", where)
    kind = field_of(part, "type", str, f"{where}.type", required=True)
    if kind not in _PART_TYPES[role]:
        raise ProtocolError("invalid_value", f"Unsupported content type '{kind}' for a {role} "
                            f"message ({', '.join(_PART_TYPES[role])}).", f"{where}.type")
    if kind in ("input_text", "text", "output_text"):
        return UserPart("text", text=field_of(part, "text", str, f"{where}.text", required=True), wire_type=kind)
    if role == "assistant":  # its audio is not taken back in: the transcript is what it said
        transcript = field_of(part, "transcript", str, f"{where}.transcript", default="")
        return UserPart("text", text=transcript, wire_type=kind)
    if kind == "input_audio":
        b64 = field_of(part, "audio", str, f"{where}.audio", required=True)
        return UserPart("audio", data=decode_base64(b64, f"{where}.audio"), param=f"{where}.audio",
                        wire_type=kind)
    url = field_of(part, "image_url", str, f"{where}.image_url", required=True)
    return UserPart("image", data=decode_image_url(url, f"{where}.image_url", max_image_bytes),
                    param=f"{where}.image_url", wire_type=kind)


def _parse_response_create(etype: str, event_id: Optional[str], obj: dict, max_image_bytes: int) -> ResponseCreate:
    resp = field_of(obj, "response", dict, "response", default={})
    mot = resp.get("max_output_tokens", resp.get("max_response_output_tokens"))
    if mot == "inf" or mot is None:
        max_tokens = None
    elif isinstance(mot, int) and not isinstance(mot, bool) and mot >= 1:
        max_tokens = mot
    else:
        raise ProtocolError("invalid_value", "response.max_output_tokens must be a positive "
                            "integer or 'inf'.", "response.max_output_tokens")
    modalities = resp.get("output_modalities", resp.get("modalities"))
    if modalities is not None:
        modalities = check_modalities(modalities, "response.output_modalities")
    conversation = field_of(resp, "conversation", str, "response.conversation", default="auto")
    if conversation not in ("auto", "default", "none"):
        raise ProtocolError("invalid_value", f"Unknown conversation '{conversation}' (auto or none).",
                            "response.conversation")
    items = field_of(resp, "input", list, "response.input")
    if items is not None:
        items = [parse_item(_object(x, f"response.input[{i}]"), f"response.input[{i}]", max_image_bytes,
                            references=True) for i, x in enumerate(items)]
    return ResponseCreate(etype, event_id, max_tokens, modalities, conversation, items,
                          check_metadata(field_of(resp, "metadata", dict, "response.metadata")))


def _object(value, param: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{param}': expected an object.", param)
    return value


def check_metadata(value: Optional[dict]) -> Optional[dict]:
    """At most 16 string pairs, keys up to 64 and values up to 512 characters (the API's limits)."""
    if value is None:
        return None
    if len(value) > 16:
        raise ProtocolError("invalid_value", "metadata holds at most 16 pairs.", "response.metadata")
    for key, val in value.items():
        if not isinstance(val, str) or len(key) > 64 or len(val) > 512:
            raise ProtocolError("invalid_value", "metadata values must be strings (keys up to 64 "
                                "characters, values up to 512).", f"response.metadata.{key}")
    return value


def check_modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise ProtocolError("invalid_type", f"'{param}' must be a non-empty array of strings.", param)
    wanted = set(value)
    # Beta clients send ["text", "audio"]; GA means audio plus transcript by ["audio"].
    if "audio" in wanted and wanted <= {"audio", "text"}:
        return ["audio"]
    if wanted == {"text"}:
        return ["text"]
    raise ProtocolError("invalid_value", f"Unsupported output modalities {value} (audio or text).", param)
