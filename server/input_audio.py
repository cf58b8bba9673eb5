"""A session's microphone: wire audio in, 16 kHz turn audio and speech events out.

Bytes in the session's input format are decoded, resampled to 16 kHz (what the speech
encoder eats) and, with server VAD on, scored by a `SpeechDetector`. The buffer is bounded
either way: outside speech it keeps only the last `idle_audio_keep_s` (enough for the
prefix padding the detector reaches back for); inside a turn, or without VAD, it stops at
`max_turn_audio_s` (VAD: the turn is committed; manual: the excess is refused).

Sample positions are absolute 16 kHz indices since the session began, so audio_start_ms /
audio_end_ms in the API events count from the first byte the client sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from omni2.streaming.audio import MODEL_SAMPLE_RATE, AudioFormat, Resampler, decode_input_audio

from .session_config import TurnDetection

RATE = MODEL_SAMPLE_RATE


@dataclass(frozen=True)
class SpeechStarted:
    sample: int                      # absolute index where the turn's audio begins


@dataclass(frozen=True)
class SpeechStopped:
    sample: int                      # absolute index where the turn's audio ends
    audio: np.ndarray                # the turn: float32 16 kHz
    forced: bool = False             # max_turn_audio_s reached while the user still spoke


@dataclass(frozen=True)
class Overflow:
    dropped_samples: int             # manual mode: audio past max_turn_audio_s was refused


InputEvent = SpeechStarted | SpeechStopped | Overflow

# (threshold, silence_ms, prefix_padding_ms) -> object with push(np.ndarray) -> [VadEvent]
DetectorFactory = Callable[[TurnDetection], object]


def silero_detector(td: TurnDetection):
    from omni2.streaming.vad import SpeechDetector

    return SpeechDetector(threshold=td.threshold, silence_ms=td.silence_duration_ms,
                          prefix_padding_ms=td.prefix_padding_ms)


class InputAudio:
    """Not thread-safe: the session calls it from one task (or one worker thread) at a time."""

    def __init__(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection],
                 max_turn_s: float, idle_keep_s: float, detector_factory: DetectorFactory):
        self.max_samples = int(max_turn_s * RATE)
        self.keep_samples = int(idle_keep_s * RATE)
        self._factory = detector_factory
        self.samples_total = 0       # 16 kHz samples received this session
        self._chunks: list[np.ndarray] = []
        self._buf_start = 0          # absolute index of the first buffered sample
        self._buf_len = 0
        self.in_speech = False
        self.fmt = fmt
        self._resampler = Resampler(fmt.sample_rate, RATE)
        self.turn_detection = turn_detection
        self._detector = None
        self._origin = 0             # absolute index of the detector's sample 0
        if turn_detection is not None:
            self._detector = detector_factory(turn_detection)

    # ---- configuration ---------------------------------------------------------------------
    def configure(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection]) -> None:
        """Apply a session.update; a new detector starts fresh from the current position."""
        if fmt != self.fmt:
            self.fmt = fmt
            self._resampler = Resampler(fmt.sample_rate, RATE)
        if turn_detection != self.turn_detection:
            self.turn_detection = turn_detection
            self._detector = self._factory(turn_detection) if turn_detection else None
            self._origin = self.samples_total
            self.in_speech = False

    @property
    def vad(self) -> bool:
        return self._detector is not None

    @property
    def buffered_ms(self) -> int:
        return self._buf_len * 1000 // RATE

    # ---- audio in --------------------------------------------------------------------------
    def decode(self, data: bytes) -> np.ndarray:
        """Wire bytes -> 16 kHz float32 (ValueError for a cut PCM16 sample)."""
        x, _ = decode_input_audio(data, self.fmt)
        return self._resampler.process(x)

    def push(self, data: bytes) -> list[InputEvent]:
        """Take one append's bytes; return what they caused, in order."""
        x = self.decode(data)
        if x.size == 0:
            return []
        events: list[InputEvent] = []
        if not self.vad:
            room = self.max_samples - self._buf_len
            if x.size > room:
                events.append(Overflow(int(x.size - max(room, 0))))
                x = x[: max(room, 0)]
            self._append(x)
            return events
        self._append(x)
        for ev in self._detector.push(x):
            at = self._origin + ev.sample
            if ev.kind == "speech_started" and not self.in_speech:
                self.in_speech = True
                self._trim_before(at)
                events.append(SpeechStarted(at))
            elif ev.kind == "speech_stopped" and self.in_speech:
                self.in_speech = False
                events.append(SpeechStopped(at, self._take_until(at)))
        if self.in_speech and self._buf_len >= self.max_samples:
            # The user has talked for max_turn_audio_s: answer what we have, listen afresh.
            end = self._buf_start + self._buf_len
            events.append(SpeechStopped(end, self._take_until(end), forced=True))
            self.in_speech = False
            self._detector = self._factory(self.turn_detection)
            self._origin = self.samples_total
        if not self.in_speech:
            self._trim_before(self._buf_start + self._buf_len - self.keep_samples)
        return events

    def commit(self) -> np.ndarray:
        """Manual commit: everything buffered becomes one turn; the detector starts over."""
        audio = self._take_until(self._buf_start + self._buf_len)
        if self.vad and self.in_speech:
            self.in_speech = False
            self._detector = self._factory(self.turn_detection)
            self._origin = self.samples_total
        return audio

    def clear(self) -> None:
        self._take_until(self._buf_start + self._buf_len)
        self.in_speech = False

    # ---- buffer ----------------------------------------------------------------------------
    def _append(self, x: np.ndarray) -> None:
        self._chunks.append(np.asarray(x, dtype=np.float32))
        self._buf_len += x.size
        self.samples_total += x.size

    def _joined(self) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)]
        return self._chunks[0]

    def _trim_before(self, at: int) -> None:
        drop = min(max(at - self._buf_start, 0), self._buf_len)
        if drop:
            self._chunks = [self._joined()[drop:]]
            self._buf_start += drop
            self._buf_len -= drop

    def _take_until(self, at: int) -> np.ndarray:
        """Remove and return buffered samples before absolute index `at`."""
        n = min(max(at - self._buf_start, 0), self._buf_len)
        buf = self._joined()
        taken, rest = buf[:n].copy(), buf[n:]
        self._chunks = [rest]
        self._buf_start += n
        self._buf_len -= n
        return taken
