"""A session's configuration: what session.update may change, and how it is shown back.

`SessionConfig.apply(patch)` validates a session.update payload (GA nested `audio.input` /
`audio.output` shapes, or the beta flat fields) and returns the new config plus notes for
settings that were accepted but have no effect on this model. `to_wire()` is the GA
`session` object sent in session.created / session.updated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from omni2.streaming.audio import G711_SAMPLE_RATE, REALTIME_SAMPLE_RATE, AudioFormat, parse_audio_format

from .protocol import ProtocolError, check_modalities, field_of
from .settings import ServerSettings


# The session field (and query parameter of /v1/realtime) that turns omni2's extension events on.
EXTENSIONS_FIELD = "omni2_extensions"

PCM16_24K = AudioFormat("pcm16", REALTIME_SAMPLE_RATE)

# The audio formats of the beta protocol, by their beta name (an AudioFormat's encoding):
# (GA wire type, the one sample rate the name stands for). A beta name carries no rate, so
# "pcm16" is 24 kHz only: PCM at another rate (an omni2 extension; input may be any PCM rate
# streaming.audio accepts, so 16 kHz microphones need no resampling) has no beta name, and
# beta clients are shown its GA object. Output is always one of these: 24 kHz PCM16 (the
# codec's rate) or 8 kHz G.711.
BETA_FORMATS = {"pcm16": ("audio/pcm", REALTIME_SAMPLE_RATE), "g711_ulaw": ("audio/pcmu", G711_SAMPLE_RATE),
                "g711_alaw": ("audio/pcma", G711_SAMPLE_RATE)}


def format_to_wire(fmt: AudioFormat) -> dict:
    """The GA format object: PCM states its rate, G.711 (always 8 kHz) does not."""
    wire_type = BETA_FORMATS[fmt.encoding][0]
    return {"type": wire_type, "rate": fmt.sample_rate} if fmt.encoding == "pcm16" else {"type": wire_type}


def beta_format_name(fmt: AudioFormat) -> Optional[str]:
    """The beta name of a format, or None where beta has none (PCM at a rate other than 24 kHz)."""
    entry = BETA_FORMATS.get(fmt.encoding)
    return fmt.encoding if entry is not None and entry[1] == fmt.sample_rate else None


def parse_format(value, param: str, output: bool) -> AudioFormat:
    """A GA format object or beta format name -> AudioFormat, or ProtocolError."""
    if not isinstance(value, (str, dict)):
        raise ProtocolError("invalid_type", f"'{param}' must be an object like "
                            f"{{'type': 'audio/pcm', 'rate': {REALTIME_SAMPLE_RATE}}}.", param)
    try:
        fmt = parse_audio_format(value)
    except ValueError as exc:
        raise ProtocolError("invalid_value", f"Unsupported audio format: {exc}.", param) from None
    if output and beta_format_name(fmt) is None:  # (output: exactly the formats beta names)
        raise ProtocolError("invalid_value", f"Output audio is {REALTIME_SAMPLE_RATE} Hz audio/pcm, audio/pcmu or "
                            f"audio/pcma; got {format_to_wire(fmt)}.", param)
    return fmt


@dataclass(frozen=True)
class TurnDetection:
    """server_vad parameters (OpenAI names). semantic_vad is served by the same detector: its
    eagerness picks the silence window (settings.semantic_silence_ms), there is no semantic
    model deciding whether the user is done."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: Optional[int] = None
    type: str = "server_vad"
    eagerness: Optional[str] = None              # semantic_vad: low | medium | high | auto

    def to_wire(self) -> dict:
        common = {"create_response": self.create_response, "interrupt_response": self.interrupt_response}
        if self.type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness, **common}
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, **common,
                "idle_timeout_ms": self.idle_timeout_ms}


EAGERNESS = ("low", "medium", "high", "auto")


def parse_turn_detection(value, param: str, current: Optional[TurnDetection],
                         defaults: TurnDetection, semantic_silence_ms: dict[str, int]) -> Optional[TurnDetection]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object or null.", param)
    kind = field_of(value, "type", str, f"{param}.type", default="server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ProtocolError("invalid_value", f"Unsupported turn detection '{kind}' "
                            "(server_vad, semantic_vad, or null to turn it off).", f"{param}.type")
    base = current or defaults
    threshold = field_of(value, "threshold", float, f"{param}.threshold", default=base.threshold)
    if not 0.0 < threshold < 1.0:
        raise ProtocolError("invalid_value", "threshold must be between 0 and 1 (exclusive).",
                            f"{param}.threshold")
    prefix = field_of(value, "prefix_padding_ms", int, f"{param}.prefix_padding_ms",
                      default=base.prefix_padding_ms)
    silence = field_of(value, "silence_duration_ms", int, f"{param}.silence_duration_ms",
                       default=base.silence_duration_ms)
    eagerness = None
    if kind == "semantic_vad":
        eagerness = field_of(value, "eagerness", str, f"{param}.eagerness", default="auto")
        if eagerness not in EAGERNESS:
            raise ProtocolError("invalid_value", f"eagerness must be one of {', '.join(EAGERNESS)}.",
                                f"{param}.eagerness")
        silence = semantic_silence_ms[eagerness]
    if not 0 <= prefix <= 5000 or not 0 <= silence <= 10000:
        raise ProtocolError("invalid_value", "prefix_padding_ms must be 0..5000 and "
                            "silence_duration_ms 0..10000.", f"{param}.silence_duration_ms")
    create = field_of(value, "create_response", bool, f"{param}.create_response",
                      default=base.create_response)
    interrupt = field_of(value, "interrupt_response", bool, f"{param}.interrupt_response",
                         default=base.interrupt_response)
    idle = field_of(value, "idle_timeout_ms", int, f"{param}.idle_timeout_ms")
    if idle is not None and not 1000 <= idle <= 3_600_000:
        raise ProtocolError("invalid_value", "idle_timeout_ms must be 1000..3600000.", f"{param}.idle_timeout_ms")
    return TurnDetection(threshold, prefix, silence, create, interrupt, idle, kind, eagerness)


def parse_transcription(value, param: str) -> Optional[dict]:
    """audio.input.transcription: null (off) or {model, language, prompt}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object or null.", param)
    out = {}
    for key in ("model", "language", "prompt"):
        v = field_of(value, key, str, f"{param}.{key}")
        if v is not None:
            out[key] = v
    out.setdefault("model", "whisper-1")
    return out


@dataclass(frozen=True)
class SessionConfig:
    model: str
    input_format: AudioFormat = PCM16_24K
    output_format: AudioFormat = PCM16_24K
    voice: str = "default"
    turn_detection: Optional[TurnDetection] = TurnDetection()
    output_modalities: tuple[str, ...] = ("audio",)
    max_output_tokens: Optional[int] = None      # None = "inf" (capped by settings.max_steps)
    instructions: str = ""
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    seed: Optional[int] = None
    # omni2 extension events (conversation.context.truncated) go out only to clients that ask:
    # strict GA clients validate every event against the API's own list.
    extensions: bool = False
    transcription: Optional[dict] = None         # {model, language, prompt}: input transcription on

    @classmethod
    def default(cls, settings: ServerSettings, model: str) -> "SessionConfig":
        vad = TurnDetection(settings.vad_threshold, settings.vad_prefix_padding_ms,
                            settings.vad_silence_ms)
        return cls(model=model, voice=settings.voice, turn_detection=vad,
                   temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)

    def apply(self, patch: dict, settings: ServerSettings) -> tuple["SessionConfig", list[str]]:
        """The config after a session.update payload, and notes on ignored settings."""
        changes: dict = {}
        notes: list[str] = []
        defaults = SessionConfig.default(settings, self.model).turn_detection
        stype = field_of(patch, "type", str, "session.type", default="realtime")
        if stype != "realtime":
            raise ProtocolError("invalid_value", f"Session type '{stype}' is not offered "
                                "(only 'realtime').", "session.type")
        audio = field_of(patch, "audio", dict, "session.audio", default={})
        a_in = field_of(audio, "input", dict, "session.audio.input", default={})
        a_out = field_of(audio, "output", dict, "session.audio.output", default={})

        fmt_in = a_in.get("format", patch.get("input_audio_format"))
        if fmt_in is not None:
            param = "session.audio.input.format" if "format" in a_in else "session.input_audio_format"
            changes["input_format"] = parse_format(fmt_in, param, output=False)
        fmt_out = a_out.get("format", patch.get("output_audio_format"))
        if fmt_out is not None:
            param = "session.audio.output.format" if "format" in a_out else "session.output_audio_format"
            changes["output_format"] = parse_format(fmt_out, param, output=True)

        if "turn_detection" in a_in or "turn_detection" in patch:
            in_ga = "turn_detection" in a_in
            value = a_in["turn_detection"] if in_ga else patch["turn_detection"]
            param = "session.audio.input.turn_detection" if in_ga else "session.turn_detection"
            changes["turn_detection"] = parse_turn_detection(value, param, self.turn_detection, defaults,
                                                             settings.semantic_silence_ms)
            td = changes["turn_detection"]
            if td is not None and td.type == "semantic_vad":
                notes.append(f"semantic_vad: the end of a turn is {td.silence_duration_ms} ms of silence "
                             f"(eagerness {td.eagerness}); there is no semantic turn model.")

        voice = a_out.get("voice", patch.get("voice"))
        if voice is not None:
            if isinstance(voice, dict):
                voice = voice.get("id")
            if not isinstance(voice, str):
                raise ProtocolError("invalid_type", "voice must be a string.", "session.audio.output.voice")
            changes["voice"] = voice
            notes.append("Mini-Omni2 speaks with one voice; the voice name is only echoed.")
        if a_out.get("speed") not in (None, 1, 1.0):
            notes.append("audio.output.speed is ignored: speech is produced at its natural rate.")

        modalities = patch.get("output_modalities", patch.get("modalities"))
        if modalities is not None:
            changes["output_modalities"] = tuple(check_modalities(modalities, "session.output_modalities"))
        mot = patch.get("max_output_tokens", patch.get("max_response_output_tokens"))
        if mot is not None:
            if mot == "inf":
                changes["max_output_tokens"] = None
            elif isinstance(mot, int) and not isinstance(mot, bool) and mot >= 1:
                changes["max_output_tokens"] = mot
            else:
                raise ProtocolError("invalid_value", "max_output_tokens must be a positive integer "
                                    "or 'inf'.", "session.max_output_tokens")
        instructions = field_of(patch, "instructions", str, "session.instructions")
        if instructions is not None:
            changes["instructions"] = instructions
            if instructions:
                notes.append("instructions are ignored: Mini-Omni2 was trained with one fixed "
                              "system prompt.")
        for key, kind, lo, hi in (("temperature", float, 0.0, 2.0), ("top_p", float, 0.0, 1.0),
                                  ("top_k", int, 1, 1 << 20)):
            value = field_of(patch, key, kind, f"session.{key}")
            if value is not None:
                if not lo <= value <= hi or (key == "top_p" and value == 0.0):
                    raise ProtocolError("invalid_value", f"{key} must be in [{lo}, {hi}].", f"session.{key}")
                changes[key] = value
        seed = field_of(patch, "seed", int, "session.seed")
        if seed is not None:
            changes["seed"] = seed
        extensions = field_of(patch, EXTENSIONS_FIELD, bool, f"session.{EXTENSIONS_FIELD}")
        if extensions is not None:
            changes["extensions"] = extensions
        if patch.get("tools"):
            notes.append("tools are ignored: the model cannot call functions.")
        if "transcription" in a_in or "input_audio_transcription" in patch:
            in_ga = "transcription" in a_in
            value = a_in["transcription"] if in_ga else patch["input_audio_transcription"]
            param = "session.audio.input.transcription" if in_ga else "session.input_audio_transcription"
            changes["transcription"] = parse_transcription(value, param)
            if changes["transcription"]:
                notes.append("input transcription runs on the server's own offline recognizer "
                             "(whisper, CTranslate2); the model name is only echoed.")
        return dataclasses.replace(self, **changes), notes

    def to_wire(self, session_id: str) -> dict:
        """The GA session object (RealtimeSessionCreateRequest shape) with the server's id."""
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": self.model,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": 0,
            "include": None,
            "audio": {
                "input": {
                    "format": format_to_wire(self.input_format),
                    "transcription": self.transcription,
                    "noise_reduction": None,
                    "turn_detection": self.turn_detection.to_wire() if self.turn_detection else None,
                },
                "output": {"format": format_to_wire(self.output_format), "voice": self.voice, "speed": 1.0},
            },
            # omni2 extension: sampling is not part of the GA session object.
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            **({EXTENSIONS_FIELD: True} if self.extensions else {}),
        }
