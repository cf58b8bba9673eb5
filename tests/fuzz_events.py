"""Hypothesis strategies for client messages: mostly well-shaped realtime events with wrong,
extreme or missing values, plus raw JSON that json.dumps cannot write (1e999, NaN, integers
over 4300 digits, deep nesting, cut-off text, bytes that are not UTF-8).

`messages()` draws one WebSocket message (str or bytes). Shared by the fuzz tests in
test_server_guard.py (a quick run in the default suite, >= 10,000 events under `slow`).
"""
from __future__ import annotations

import base64
import json

from hypothesis import strategies as st

from server_harness import png_data_url

EDGE_NUMBERS = [0, -1, 1, 7, 8000, 8001, 16000, 16001, 24000, 44100, 44101, 47999, 48000, 2 ** 31,
                2 ** 63, -2 ** 63, 10 ** 30, 0.5, -0.0, 1e-320, 1e308, -1e308, 16000.0, 16000.5,
                float("inf"), float("-inf"), float("nan")]  # json.dumps writes Infinity, NaN
KEYS = ["type", "event_id", "session", "audio", "input", "output", "format", "rate", "turn_detection",
        "item", "content", "role", "text", "image", "image_url", "response", "response_id", "item_id",
        "audio_end_ms", "content_index", "max_output_tokens", "output_modalities", "modalities",
        "threshold", "silence_duration_ms", "prefix_padding_ms", "voice", "temperature", "top_p",
        "top_k", "seed", "previous_item_id", "conversation", "instructions", "tools"]
KNOWN_TYPES = ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
               "input_audio_buffer.clear", "conversation.item.create", "response.create",
               "response.cancel", "conversation.item.truncate", "input_image_buffer.append"]
EVENT_TYPES = KNOWN_TYPES * 3 + ["conversation.item.delete", "conversation.item.retrieve",
                                 "output_audio_buffer.clear", "transcription_session.update",
                                 "session.created", "", "response.create "]

numbers = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(-10 ** 6, 10 ** 6),
                    st.floats(allow_nan=False, allow_infinity=False, width=64))
b64 = st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode())
strings = st.one_of(st.text(max_size=24), st.sampled_from(["inf", "auto", "none", "user", "assistant",
                                                           "message", "realtime", "server_vad", "=", "@@"]),
                    b64)
leaf = st.one_of(st.none(), st.booleans(), numbers, strings)
anything = st.recursive(leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), kids, max_size=3)),
    max_leaves=8)


def maybe(value_strategy):
    """A plausible value most of the time, anything at all otherwise."""
    return st.one_of(*[value_strategy] * 5, anything)


# Rates the resampler takes, rates it cannot (44101 Hz: 16000 filter phases), non-numbers.
rates = st.one_of(st.sampled_from([8000, 11025, 16000, 24000, 44100, 48000, 8001, 16001, 44101, 47999,
                                   float("inf"), float("-inf"), float("nan"), 10 ** 40]), numbers)
audio_formats = maybe(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["audio/pcm", "audio/pcm", "audio/pcmu", "audio/mp3"])},
                          optional={"rate": rates}),
    st.sampled_from(["pcm16", "pcm16-16k", "g711_ulaw", "g711_alaw", "audio/pcm", "audio/pcmu"]),
    rates.map(lambda r: f"audio/pcm;rate={r}")))
turn_detection = maybe(st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "type": maybe(st.sampled_from(["server_vad", "semantic_vad", "none"])),
    "threshold": numbers, "prefix_padding_ms": numbers, "silence_duration_ms": numbers,
    "create_response": maybe(st.booleans()), "interrupt_response": maybe(st.booleans())})))
session = st.fixed_dictionaries({}, optional={
    "type": maybe(st.just("realtime")),
    "audio": maybe(st.fixed_dictionaries({}, optional={
        "input": maybe(st.fixed_dictionaries({"format": audio_formats}, optional={
            "turn_detection": turn_detection})),
        "output": maybe(st.fixed_dictionaries({}, optional={"format": audio_formats, "voice": maybe(st.just("x")),
                                                            "speed": maybe(st.just(1.0))}))})),
    "input_audio_format": audio_formats, "output_audio_format": audio_formats,
    "turn_detection": turn_detection, "temperature": numbers, "top_p": numbers, "top_k": numbers,
    "seed": numbers, "max_output_tokens": maybe(st.one_of(numbers, st.just("inf"))),
    "output_modalities": maybe(st.lists(st.sampled_from(["audio", "text", "video"]), max_size=3)),
    "modalities": maybe(st.just(["text", "audio"])), "instructions": maybe(st.text(max_size=20)),
    "tools": maybe(st.just([])), "voice": maybe(st.sampled_from(["alloy", "default"]))})
images = st.one_of(st.just(png_data_url()), st.just("data:image/png;base64,aGVsbG8="),
                   b64.map(lambda s: "data:image/jpeg;base64," + s), st.just("https://example.com/x.png"),
                   strings)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("input_text")}, optional={"text": maybe(st.text(max_size=40))}),
    st.fixed_dictionaries({"type": st.just("input_audio")}, optional={"audio": maybe(b64)}),
    st.fixed_dictionaries({"type": st.just("input_image")}, optional={"image_url": maybe(images)}))
item = st.fixed_dictionaries({"role": maybe(st.sampled_from(["user", "user", "assistant", "system"]))}, optional={
    "type": maybe(st.just("message")),
    "content": maybe(st.lists(maybe(parts), min_size=1, max_size=3)), "id": maybe(strings)})
response = st.fixed_dictionaries({}, optional={
    "max_output_tokens": maybe(st.one_of(st.integers(1, 6), st.just("inf"), numbers)),
    "output_modalities": maybe(st.lists(st.sampled_from(["audio", "text"]), max_size=2)),
    "conversation": maybe(st.sampled_from(["auto", "none"])), "input": maybe(st.none())})

# (fields always sent, fields sometimes sent) per event type
FIELDS = {
    "session.update": ({"session": maybe(session | st.fixed_dictionaries({"audio": st.fixed_dictionaries(
        {"input": st.fixed_dictionaries({"format": audio_formats})})}))}, {}),
    "input_audio_buffer.append": ({"audio": maybe(b64)}, {}),
    "conversation.item.create": ({"item": maybe(item)}, {"previous_item_id": maybe(st.none())}),
    "response.create": ({}, {"response": maybe(response)}),
    "response.cancel": ({}, {"response_id": maybe(strings)}),
    "conversation.item.truncate": ({"item_id": maybe(st.sampled_from(["item_1", ""])), "audio_end_ms": numbers},
                                   {"content_index": numbers}),
    "input_image_buffer.append": ({"image": maybe(images)}, {}),
}


@st.composite
def events(draw) -> dict:
    odd = draw(st.integers(0, 19))
    etype = draw(anything) if odd == 0 else draw(st.sampled_from(EVENT_TYPES))
    required, optional = FIELDS.get(etype, ({}, {})) if isinstance(etype, str) else ({}, {})
    if odd == 1:  # a required field left out
        required, optional = {}, {**required, **optional}
    event = draw(st.fixed_dictionaries(required, optional={**optional, "event_id": st.text(max_size=8)}))
    if odd != 2:  # sometimes the type is missing
        event["type"] = etype
    return event


RAW_NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 4400, "-" + "9" * 5000, "1e-999",
               "0." + "0" * 5000 + "1"]


@st.composite
def messages(draw):
    """One WebSocket message: an event as JSON, often with its text mangled."""
    text = json.dumps(draw(events()))
    how = draw(st.integers(0, 14))
    if how == 0:    # a number json.dumps cannot write, in place of one it did
        spots = [i for i, c in enumerate(text) if c in "-0123456789" and text[i - 1] in ": [,"]
        if spots:
            i = draw(st.sampled_from(spots))
            j = i + 1
            while j < len(text) and text[j] in "0123456789.eE+-":
                j += 1
            text = text[:i] + draw(st.sampled_from(RAW_NUMBERS)) + text[j:]
    elif how == 1:  # cut off
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    elif how == 2:  # nested past any parser's stack
        depth = draw(st.sampled_from([100, 5000, 200_000]))
        text = "[" * depth + text + "]" * depth
    elif how == 3:  # bytes, sometimes not UTF-8
        return text.encode() + draw(st.sampled_from([b"", b"\xff", b"\xc3"]))
    return text
