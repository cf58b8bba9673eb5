"""Server pieces without a socket: event validation, session config, buffers, metrics, settings."""
from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from omni2.server import protocol as p
from omni2.server.input_audio import InputAudio, Overflow, SpeechStarted, SpeechStopped
from omni2.server.metrics import Metrics
from omni2.server.outbox import Outbox, SlowReader
from omni2.server.events import to_beta
from omni2.server.session_config import BETA_FORMATS, SessionConfig, TurnDetection, beta_format_name
from omni2.server.settings import ServerSettings, SettingsError, settings_from_env
from omni2.streaming.audio import AudioFormat
from omni2.streaming.listening.detector import Detector, Heard
from omni2.streaming.listening.vad import CHUNK, SileroStream

from server_harness import jpeg_data_url, png_data_url

S = ServerSettings()


def parse(obj, raw=None):
    return p.parse_message(raw if raw is not None else json.dumps(obj), S.max_message_bytes, S.max_image_bytes)


def error_of(obj=None, raw=None) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        parse(obj, raw)
    return info.value


# ---- client events ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw,code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ('{"event_id": "e1"}', "missing_required_parameter"),
    ('{"type": 7}', "invalid_type"),
    ('{"type": "no.such.event", "event_id": "e9"}', "unknown_event_type"),
    ('{"type": "output_audio_buffer.clear"}', "unsupported_event"),
    ('{"type": "conversation.item.delete"}', "missing_required_parameter"),
    (b"\xff\xfe", "invalid_json"),
    ('{"type": "session.update", "session": {"seed": ' + "1" * 4301 + "}}", "invalid_json"),  # int limit
    ('{"type": "session.update", "session": {"temperature": NaN}}', "invalid_json"),
    ('{"type": "session.update", "session": {"temperature": -Infinity}}', "invalid_json"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json"),
])
def test_malformed_messages_get_their_codes(raw, code):
    err = error_of(raw=raw)
    assert err.code == code
    assert err.type == "invalid_request_error"


def test_error_echoes_the_client_event_id_and_names_the_param():
    err = error_of({"type": "input_audio_buffer.append", "event_id": "evt_42", "audio": 123})
    assert (err.code, err.param, err.event_id) == ("invalid_type", "audio", "evt_42")
    err = error_of({"type": "input_audio_buffer.append", "event_id": "evt_43", "audio": "@@not base64@@"})
    assert (err.code, err.param, err.event_id) == ("invalid_base64", "audio", "evt_43")
    err = error_of({"type": "input_audio_buffer.append"})
    assert (err.code, err.param) == ("missing_required_parameter", "audio")


def test_message_size_limit():
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (S.max_message_bytes + 10)})
    assert error_of(raw=big).code == "message_too_large"


def test_append_decodes_base64():
    pcm = (np.arange(10, dtype="<i2") * 100).tobytes()
    e = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
    assert isinstance(e, p.AudioAppend) and e.audio == pcm


def test_item_create_with_text_audio_and_image():
    e = parse({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hello"},
            {"type": "input_audio", "audio": base64.b64encode(b"\0\0" * 8).decode()},
            {"type": "input_image", "image_url": jpeg_data_url()}]}})
    assert [part.kind for part in e.parts] == ["text", "audio", "image"]
    assert e.parts[2].data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("item,code,param", [
    ({"type": "message", "role": "assistant", "content": [{"type": "input_text", "text": "x"}]},
     "invalid_value", "item.content[0].type"),
    ({"type": "message", "role": "developer", "content": []}, "invalid_value", "item.role"),
    ({"type": "function_call", "role": "user", "content": []}, "unsupported_item_type", "item.type"),
    ({"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]},
     "invalid_type", "item.content[0].text"),
    ({"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:image/gif;base64,R0lGODlh"}]},
     "invalid_image", "item.content[0].image_url"),
    ({"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]},
     "invalid_image", "item.content[0].image_url"),
    ({"type": "message", "role": "user", "content": "hi"}, "invalid_type", "item.content"),
])
def test_item_create_errors(item, code, param):
    err = error_of({"type": "conversation.item.create", "item": item})
    assert (err.code, err.param) == (code, param)


def test_corrupt_png_is_refused_when_verified():
    url = png_data_url()
    data = base64.b64decode(url.split(",", 1)[1])
    corrupt = data[:40] + b"\0" * 30 + data[70:]
    with pytest.raises(p.ProtocolError) as info:
        p.verify_image(corrupt, S.max_image_pixels, "image")
    assert info.value.code == "invalid_image"
    with pytest.raises(p.ProtocolError) as info:
        p.verify_image(data, 100, "image")  # 32x24 > 100 pixels
    assert info.value.code == "image_too_large"
    p.verify_image(data, S.max_image_pixels, "image")


def test_response_create_options():
    e = parse({"type": "response.create", "response": {"max_output_tokens": 64, "modalities": ["text", "audio"]}})
    assert (e.max_output_tokens, e.output_modalities) == (64, ["audio"])
    assert error_of({"type": "response.create", "response": {"max_output_tokens": 0}}).param == "response.max_output_tokens"
    assert error_of({"type": "response.create", "response": {"conversation": "other"}}).code == "invalid_value"
    e = parse({"type": "response.create", "response": {"conversation": "none", "metadata": {"k": "v"}, "input": [
        {"type": "item_reference", "id": "item_1"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "be brief"}]}]}})
    assert e.out_of_band and e.metadata == {"k": "v"}
    assert [(i.role, i.reference, i.text) for i in e.input] == [("reference", "item_1", ""), ("system", None, "be brief")]
    assert error_of({"type": "response.create", "response": {"metadata": {"k": 1}}}).param == "response.metadata.k"


def test_assistant_and_system_items_are_text():
    e = parse({"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Hi."}, {"type": "output_audio", "transcript": "How can I help?"}]}})
    assert (e.item.role, e.item.text, e.previous_item_id) == ("assistant", "Hi.\nHow can I help?", "root")
    e = parse({"type": "conversation.item.create", "item": {
        "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be brief."}]}})
    assert (e.item.role, e.item.text) == ("system", "Be brief.")


def test_truncate_needs_non_negative_values():
    assert error_of({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": -1}).param == "audio_end_ms"
    e = parse({"type": "conversation.item.truncate", "item_id": "i", "content_index": 0, "audio_end_ms": 5})
    assert (e.item_id, e.audio_end_ms) == ("i", 5)


# ---- session configuration ---------------------------------------------------------------------
def test_session_update_ga_shape():
    cfg = SessionConfig.default(S, "m")
    cfg, notes = cfg.apply({"type": "realtime", "instructions": "be brief", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}}}, S)
    assert cfg.input_format == AudioFormat("pcm16", 16000)
    assert cfg.output_format == AudioFormat("g711_ulaw", 8000)
    assert cfg.turn_detection is None and cfg.voice == "alloy"
    assert any("instructions" in n for n in notes)
    wire = cfg.to_wire("sess_1")
    assert wire["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert wire["audio"]["input"]["turn_detection"] is None


def test_session_update_beta_shape():
    cfg, _ = SessionConfig.default(S, "m").apply({
        "input_audio_format": "g711_alaw", "output_audio_format": "pcm16", "modalities": ["text", "audio"],
        "turn_detection": {"type": "server_vad", "threshold": 0.7, "silence_duration_ms": 300},
        "temperature": 0.8}, S)
    assert cfg.input_format == AudioFormat("g711_alaw", 8000)
    assert cfg.turn_detection == TurnDetection(threshold=0.7, prefix_padding_ms=300, silence_duration_ms=300)
    assert cfg.turn_detection.silence_duration_ms == 300 and cfg.temperature == 0.8
    assert cfg.output_modalities == ("audio",)


def test_audio_formats_round_trip_between_beta_names_and_ga_objects():
    """A beta format name set in session.update is shown back to a beta client by the same
    name, and to a GA client as its GA object, which names the same format; a PCM rate the
    beta protocol cannot name (pcm16 is 24 kHz only) is shown to both as the GA object."""
    for name in BETA_FORMATS:
        cfg, _ = SessionConfig.default(S, "m").apply({"input_audio_format": name, "output_audio_format": name}, S)
        ga = cfg.to_wire("sess_1")["audio"]
        beta = to_beta({"type": "session.updated", "session": cfg.to_wire("sess_1")})["session"]
        assert beta["input_audio_format"] == beta["output_audio_format"] == name
        assert ga["input"]["format"]["type"] == BETA_FORMATS[name][0]
        back, _ = SessionConfig.default(S, "m").apply({"audio": {"input": ga["input"], "output": ga["output"]}}, S)
        assert back.input_format == back.output_format == cfg.input_format == AudioFormat(name, BETA_FORMATS[name][1])
    cfg, _ = SessionConfig.default(S, "m").apply({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, S)
    beta = to_beta({"type": "session.updated", "session": cfg.to_wire("sess_1")})["session"]
    assert beta["input_audio_format"] == {"type": "audio/pcm", "rate": 16000} and beta["output_audio_format"] == "pcm16"
    assert beta_format_name(AudioFormat("pcm16", 16000)) is None


@pytest.mark.parametrize("patch,param", [
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}},
     "session.audio.input.turn_detection.threshold"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.output.format"),
    ({"audio": {"input": {"format": {"type": "audio/flac"}}}}, "session.audio.input.format"),
    ({"input_audio_format": 5}, "session.input_audio_format"),
    ({"type": "transcription"}, "session.type"),
    ({"audio": "loud"}, "session.audio"),
    ({"temperature": "hot"}, "session.temperature"),
])
def test_session_update_errors(patch, param):
    with pytest.raises(p.ProtocolError) as info:
        SessionConfig.default(S, "m").apply(patch, S)
    assert info.value.param == param


# ---- input audio buffer --------------------------------------------------------------------------
class ScriptedDetector(Detector):
    """Fires the given events when the pushed audio reaches their sample index (it scores
    nothing: no chunks for the VAD, its events come out of consume_input)."""

    def __init__(self, script):
        self.script = [Heard(k, s) for k, s in script]
        self.seen = 0
        self._stream = SileroStream()

    @property
    def stream(self):
        return self._stream

    def prepare_input(self, x):
        self.seen += x.size
        return np.zeros((0, CHUNK), np.float32)

    def consume_input(self, chunks, probs):
        due = [e for e in self.script if e.sample <= self.seen]
        self.script = [e for e in self.script if e not in due]
        return due

    def feed_input(self, x):
        return self.consume_input(self.prepare_input(x), [])


def pcm16k_bytes(seconds):
    return np.zeros(int(16000 * seconds), dtype="<i2").tobytes()


def test_vad_buffer_cuts_turns_and_stays_bounded():
    det = ScriptedDetector([("speech_started", 16000), ("speech_stopped", 40000)])
    audio = InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), max_turn_s=10, idle_keep_s=1.0,
                       detector_factory=lambda td: det)
    events = []
    for _ in range(30):
        events += audio.push(pcm16k_bytes(0.1))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert events[0].sample == 16000 and events[1].sample == 40000
    assert events[1].audio.size == 24000
    assert audio.buffered_ms <= 1000  # idle: only the prefix window is kept


def test_vad_forces_a_commit_at_the_turn_limit():
    audio = InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), max_turn_s=1.0, idle_keep_s=0.5,
                       detector_factory=lambda td: ScriptedDetector([("speech_started", 0)]))
    events = []
    for _ in range(15):
        events += audio.push(pcm16k_bytes(0.1))
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert stops and stops[0].forced and stops[0].audio.size == 16000


def test_manual_buffer_refuses_past_the_limit():
    audio = InputAudio(AudioFormat("pcm16", 16000), None, max_turn_s=0.5, idle_keep_s=0.5,
                       detector_factory=lambda td: None)
    events = []
    for _ in range(7):
        events += audio.push(pcm16k_bytes(0.1))
    assert [type(e) for e in events] == [Overflow, Overflow]
    assert audio.commit().size == 8000 and audio.buffered_ms == 0


def test_odd_pcm16_bytes_are_refused():
    audio = InputAudio(AudioFormat("pcm16", 24000), None, 1.0, 0.5, lambda td: None)
    with pytest.raises(ValueError):
        audio.push(b"\0\0\0")


# ---- outbox ----------------------------------------------------------------------------------------
def test_outbox_withdraws_cancelled_audio_and_detects_stalled_readers():
    async def main():
        box = Outbox(limit=3, stall_timeout_s=0.2)
        await box.put({"type": "response.output_audio.delta", "response_id": "r1", "delta": ""})
        await box.put({"type": "response.output_audio_transcript.delta", "response_id": "r1"})
        await box.put({"type": "response.output_audio.delta", "response_id": "r2", "delta": ""})
        assert len(await box.drop_audio("r1")) == 1
        assert [e["response_id"] for e in box._queue] == ["r1", "r2"]
        await box.put({"type": "x"})
        with pytest.raises(SlowReader):
            await box.put({"type": "y"})
    asyncio.run(main())


def test_outbox_beta_names():
    box = Outbox(4, 1.0, beta_names=True)
    assert json.loads(box.encode({"type": "response.output_audio.delta"}))["type"] == "response.audio.delta"
    assert json.loads(Outbox(4, 1.0).encode({"type": "response.output_audio.delta"}))["type"] == \
        "response.output_audio.delta"


# ---- metrics and settings -----------------------------------------------------------------------------
def test_metrics_text_format_and_engine_step_window():
    m = Metrics()
    m.ttfa.observe(0.12)
    m.ttfa.observe(7.0)
    m.errors_total.inc(label="invalid_json")
    m.absorb_engine({"steps_total": 3, "step_seconds": [0.01, 0.02, 0.03]})
    m.absorb_engine({"steps_total": 5, "step_seconds": [0.01, 0.02, 0.03, 0.04, 0.05],
                     "vocoder_audio_seconds_total": 12.5, "vocoder_calls_total": 4})
    text = m.render()
    assert "omni2_vocoder_audio_seconds 12.5" in text and "omni2_vocoder_calls 4" in text
    assert "omni2_vocoder_busy_seconds 0" in text
    assert 'omni2_time_to_first_audio_seconds_bucket{le="0.15"} 1' in text
    assert 'omni2_time_to_first_audio_seconds_bucket{le="+Inf"} 2' in text
    assert "omni2_engine_step_seconds_count 5" in text
    assert 'omni2_errors_total{code="invalid_json"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2, line


def test_settings_env_and_validation():
    s = settings_from_env({"OMNI2_API_KEYS": "k1, k2", "OMNI2_MAX_SESSIONS": "3",
                           "OMNI2_WARMUP": "off"}, port=9000)
    assert s.api_keys == ("k1", "k2") and s.max_sessions == 3 and s.port == 9000 and not s.warmup
    with pytest.raises(SettingsError, match="OMNI2_MAX_SESSIONS"):
        settings_from_env({"OMNI2_MAX_SESSIONS": "many"})
    with pytest.raises(SettingsError, match="max_sessions"):
        ServerSettings(max_sessions=-1)
    assert "k1" not in json.dumps(s.public())


class ScriptedListener(ScriptedDetector):
    """A duplex controller stand-in: scripted VAD events and interrupts, an audible flag."""

    decides_interrupts = True

    def __init__(self, script, audible_from=0, audible_to=0):
        super().__init__([])
        self.script = [Heard("interrupt", s, k, "stop omni" if k == "command" else None, 0.9, "", 120)
                       if k in ("command", "barge_in") else Heard(k, s) for k, s in script]
        self.audible_span = (audible_from, audible_to)
        self.notes = []

    def audible(self, at=None):
        return self.audible_span[0] <= at < self.audible_span[1]

    def set_speaking(self, speaking):
        self.notes.append(speaking)

    def feed_output(self, pcm):
        self.notes.append(pcm.size)


def listen(script, audible=(0, 0), seconds=3.0):
    from omni2.server.input_audio import Interrupted

    ctl = ScriptedListener(script, *audible)
    audio = InputAudio(AudioFormat("pcm16", 16000), TurnDetection(), max_turn_s=10, idle_keep_s=1.0,
                       detector_factory=lambda td: ctl)
    assert audio.listener
    audio.note_speaking(True)
    audio.note_output(np.zeros(2400, np.float32))
    events = []
    for _ in range(int(seconds * 10)):
        events += audio.push(pcm16k_bytes(0.1))
    kinds = [type(e).__name__ if not isinstance(e, Interrupted) else f"Interrupted:{e.kind}" for e in events]
    return kinds, events, ctl


def test_listener_ignores_talk_over_the_answer_without_an_interrupt():
    kinds, _, ctl = listen([("speech_started", 8000), ("speech_stopped", 30000)], audible=(0, 48000))
    assert kinds == []
    assert ctl.notes == [True, 2400]  # answer start and echo reference reached the controller


def test_listener_barge_in_turns_the_held_speech_into_a_turn():
    kinds, events, _ = listen([("speech_started", 8000), ("barge_in", 12800), ("speech_stopped", 30000)],
                              audible=(0, 48000))
    assert kinds == ["SpeechStarted", "Interrupted:barge_in", "SpeechStopped"]
    assert events[0].sample == 8000 and events[2].audio.size == 22000


def test_listener_command_stops_without_a_turn():
    kinds, events, _ = listen([("speech_started", 8000), ("command", 20000), ("speech_stopped", 30000)],
                              audible=(0, 48000))
    assert kinds == ["Interrupted:command"]
    assert (events[0].phrase, events[0].played_ms) == ("stop omni", 120)


def test_listener_speech_after_the_answer_is_a_normal_turn():
    kinds, _, _ = listen([("speech_started", 8000), ("speech_stopped", 30000)], audible=(0, 4000))
    assert kinds == ["SpeechStarted", "SpeechStopped"]
