"""A session's microphone: wire audio in, 16 kHz turn audio and speech events out.

Bytes in the session's input format are decoded, resampled to 16 kHz (what the speech
encoder eats) and, with server VAD on, scored by a `SpeechDetector`. The buffer is bounded
either way: outside speech it keeps only the last `idle_audio_keep_s` (enough for the
prefix padding the detector reaches back for); inside a turn, or without VAD, it stops at
`max_turn_audio_s` (VAD: the turn is committed; manual: the excess is refused).

The detector is a streaming.listening.detector.Detector, driven only through that interface:
a plain `SpeechDetector` (OpenAI semantics: any speech may interrupt, the session decides)
or a `DuplexController` (interrupt_mode command / barge_in: `decides_interrupts`), which
also hears what the assistant plays (`note_output`) and reports "interrupt" events. With such
a listener, speech that starts while the assistant is audible is *held*: no events, no turn,
unless a barge-in interrupt promotes it to a turn; a spoken command ("stop omni") is discarded.

Sample positions are absolute 16 kHz indices since the session began, so audio_start_ms /
audio_end_ms in the API events count from the first byte the client sent.

Turn audio ends `tail_ms` into the quiet that ends the speech, not at `speech_stopped`
(which waits the full `silence_duration_ms`): the detector reports a `SpeechPaused` with
exactly that audio as soon as it exists, so the session can start encoding and prefilling
the question speculatively, and the `SpeechStopped` of the same quiet run carries the same
audio. `SpeechResumed` says the speculation is void (the user went on talking).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from omni2.streaming.audio import MODEL_SAMPLE_RATE, REALTIME_SAMPLE_RATE, AudioFormat, Resampler, decode_input_audio
from omni2.streaming.cpu.threads import single_threaded
from omni2.streaming.listening.detector import Detector, Heard

from .session_config import TurnDetection

RATE = MODEL_SAMPLE_RATE
NOTES_MAX_S = 30.0     # echo reference waiting for the next microphone packet, at most


@dataclass(frozen=True)
class SpeechStarted:
    sample: int                      # absolute index where the turn's audio begins


@dataclass(frozen=True)
class SpeechStopped:
    sample: int                      # absolute index where the VAD's silence ran out
    audio: np.ndarray                # the turn: float32 16 kHz (ends tail_ms into the quiet)
    forced: bool = False             # max_turn_audio_s reached while the user still spoke


@dataclass(frozen=True)
class SpeechPaused:
    sample: int                      # absolute index where the turn's audio would end
    audio: np.ndarray                # the turn if the quiet lasts (a copy)


@dataclass(frozen=True)
class SpeechResumed:
    sample: int


@dataclass(frozen=True)
class Overflow:
    dropped_samples: int             # manual mode: audio past max_turn_audio_s was refused


@dataclass(frozen=True)
class Interrupted:
    kind: str                        # "command" | "barge_in" | "model"
    phrase: Optional[str]
    sample: int                      # absolute index where the controller decided
    played_ms: int                   # answer audio the client had played by then
    audible: bool = True             # an answer was being generated or still playing then


@dataclass
class PushWork:
    """One append between InputAudio.begin_push and end_push."""
    samples: int                                  # 16 kHz samples the append brought
    chunks: Optional[np.ndarray] = None           # VAD chunks to score (None: no VAD)
    events: list = field(default_factory=list)    # what the append caused before the VAD


InputEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechStopped | Overflow | Interrupted

# TurnDetection -> the session's Detector (a SpeechDetector or a DuplexController)
DetectorFactory = Callable[[TurnDetection], Detector]
DEFAULT_TAIL_MS = 200


def silero_detector(td: TurnDetection, tail_ms: int = DEFAULT_TAIL_MS):
    from omni2.streaming.listening.vad import SpeechDetector

    return SpeechDetector(threshold=td.threshold, silence_ms=td.silence_duration_ms,
                          prefix_padding_ms=td.prefix_padding_ms, pause_ms=tail_ms)


def duplex_detector(mode: str, phrases: tuple[str, ...] = ("stop omni",),
                    tail_ms: int = DEFAULT_TAIL_MS) -> DetectorFactory:
    """Factory of DuplexControllers ('command' or 'barge_in') with the session's VAD settings."""
    def make(td: TurnDetection):
        from omni2.streaming.listening.duplex import DuplexConfig, DuplexController
        from omni2.streaming.listening.interrupt import CommandConfig

        cfg = DuplexConfig(mode=mode, vad_threshold=td.threshold, silence_ms=td.silence_duration_ms,
                           prefix_padding_ms=td.prefix_padding_ms, pause_ms=tail_ms,
                           command=CommandConfig(phrases=phrases))
        return DuplexController(cfg)
    return make


def detector_factory_for(interrupt_mode: str, phrases: tuple[str, ...] = ("stop omni",),
                         tail_ms: int = DEFAULT_TAIL_MS) -> DetectorFactory:
    """tail_ms: quiet after speech that the turn's audio keeps (the speculation point)."""
    if interrupt_mode == "vad":
        return lambda td: silero_detector(td, tail_ms)
    if interrupt_mode in ("command", "barge_in"):
        return duplex_detector(interrupt_mode, phrases, tail_ms)
    raise ValueError(f"interrupt_mode must be vad, barge_in or command, got {interrupt_mode!r}")


class InputAudio:
    """Not thread-safe: the session calls it from one task (or one worker thread) at a time."""

    def __init__(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection],
                 max_turn_s: float, idle_keep_s: float, detector_factory: DetectorFactory):
        self.max_samples = int(max_turn_s * RATE)
        self.keep_samples = int(idle_keep_s * RATE)
        self._factory = detector_factory
        self.samples_total = 0       # 16 kHz samples received this session
        self.pushed_at = time.monotonic()  # when audio last came (the stall timeout reads it)
        self._chunks: list[np.ndarray] = []
        self._buf_start = 0          # absolute index of the first buffered sample
        self._buf_len = 0
        self.in_speech = False
        self.answering = False       # an answer is under way (note_speaking)
        self.fmt = fmt
        self._resampler = Resampler(fmt.sample_rate, RATE)
        self.turn_detection = turn_detection
        self._detector: Optional[Detector] = None
        self._origin = 0             # absolute index of the detector's sample 0
        self._held = False           # speech began while the assistant was audible
        self._discard = False        # the held speech was a command: not a turn
        self._cut: Optional[int] = None  # where the turn's audio ends if the current quiet lasts
        # Output audio and answer start/stop, noted on the event loop, applied to the
        # controller in push() (its only caller thread), in order.
        self._notes: list = []
        self._notes_samples = 0
        self._notes_lock = threading.Lock()
        if turn_detection is not None:
            self._detector = detector_factory(turn_detection)

    # ---- configuration ---------------------------------------------------------------------
    def configure(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection]) -> None:
        """Apply a session.update; a new detector starts fresh from the current position."""
        if fmt != self.fmt:
            self._resampler = Resampler(fmt.sample_rate, RATE)  # first: it may refuse the rate
            self.fmt = fmt
        if turn_detection != self.turn_detection:
            self.turn_detection = turn_detection
            self._detector = self._factory(turn_detection) if turn_detection else None
            self._origin = self.samples_total
            self.in_speech = self._held = self._discard = False
            self._cut = None
            with self._notes_lock:
                self._notes, self._notes_samples = [], 0

    @property
    def vad(self) -> bool:
        return self._detector is not None

    @property
    def listener(self) -> bool:
        """The detector decides interrupts (a duplex controller), not the session."""
        return self._detector is not None and self._detector.decides_interrupts

    def note_output(self, pcm_24k: np.ndarray) -> None:
        """Assistant audio sent to the client (echo reference); any thread.

        Applied at the next microphone packet; a client that sends no audio has no echo to
        cancel, so beyond NOTES_MAX_S of waiting reference the oldest is let go.
        """
        if not self.listener:
            return
        with self._notes_lock:
            self._notes.append(pcm_24k)
            self._notes_samples += pcm_24k.size
            while self._notes_samples > NOTES_MAX_S * REALTIME_SAMPLE_RATE:
                i = next(i for i, n in enumerate(self._notes) if not isinstance(n, bool))
                self._notes_samples -= self._notes.pop(i).size

    def note_speaking(self, speaking: bool) -> None:
        """An answer started / stopped generating; any thread."""
        self.answering = bool(speaking)
        if self.listener:
            with self._notes_lock:
                self._notes.append(bool(speaking))

    def _apply_notes(self) -> None:
        with self._notes_lock:
            notes, self._notes, self._notes_samples = self._notes, [], 0
        for note in notes:
            if isinstance(note, bool):
                self._detector.set_speaking(note)
            else:
                self._detector.feed_output(note)

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
        work = self.begin_push(data)
        probs = None
        if work.chunks is not None and work.chunks.shape[0]:
            from omni2.streaming.listening.vad import score_streams

            probs = score_streams([self.vad_stream], [work.chunks])[0]
        return self.end_push(work, probs)

    @property
    def lively(self) -> bool:
        """Speech is under way or an answer is: its next events are waited for (the end of a
        turn, a barge-in), so its appends take the listening tick's fast pace."""
        return self.in_speech or self.answering

    @property
    def may_decode(self) -> bool:
        """The listener may run its command recognizer on the next audio (slow)."""
        return self._detector is not None and self._detector.may_decode()

    @property
    def vad_stream(self):
        """The detector's silero stream (state and context), for a batched score."""
        return self._detector.stream

    def begin_push(self, data: bytes) -> "PushWork":
        """First half of push: decode, buffer, echo-cancel; the VAD chunks still to score
        (`PushWork.chunks`, None without VAD). Then score them (vad.score_streams, batched
        with other sessions' by server/listen_tick.py) and call end_push."""
        single_threaded()  # the VAD's torch work must not hold an OpenMP team (cpu_threads)
        self.pushed_at = time.monotonic()
        x = self.decode(data)
        work = PushWork(x.size)
        if x.size == 0:
            return work
        if not self.vad:
            room = self.max_samples - self._buf_len
            if x.size > room:
                work.events.append(Overflow(int(x.size - max(room, 0))))
                x = x[: max(room, 0)]
            self._append(x)
            return work
        self._append(x)
        if self.listener:
            self._apply_notes()
        work.chunks = self._detector.prepare_input(x)
        return work

    def end_push(self, work: "PushWork", probs) -> list[InputEvent]:
        """Second half of push: the speech probabilities of `work.chunks` -> events."""
        events = work.events
        if work.chunks is None:
            return events
        chunks = work.chunks
        if probs is None:  # nothing scored (no whole chunk): a detector may still have news
            chunks, probs = chunks[:0], np.zeros(0, np.float32)
        for ev in self._detector.consume_input(chunks, probs):
            if ev.kind == "interrupt":
                events += self._on_interrupt(ev)
                continue
            at = self._origin + ev.sample
            heard = not (self._held or self._discard)
            if ev.kind == "speech_started" and not self.in_speech:
                self.in_speech = True
                self._trim_before(at)
                self._held = self._detector.decides_interrupts and self._detector.audible(ev.sample)
                self._discard = False
                self._cut = None
                if not self._held:
                    events.append(SpeechStarted(at))
            elif ev.kind == "speech_paused" and self.in_speech:
                self._cut = at
                if heard:
                    events.append(SpeechPaused(at, self._peek_until(at)))
            elif ev.kind == "speech_resumed" and self.in_speech and self._cut is not None:
                self._cut = None
                if heard:
                    events.append(SpeechResumed(at))
            elif ev.kind == "speech_stopped" and self.in_speech:
                self.in_speech = False
                audio = self._take_until(at if self._cut is None else self._cut)
                if heard:
                    events.append(SpeechStopped(at, audio))
                self._held = self._discard = False
                self._cut = None
        if self.in_speech and self._buf_len >= self.max_samples:
            # The user has talked for max_turn_audio_s: answer what we have, listen afresh.
            events += self._force_stop(self._buf_start + self._buf_len)
        if not self.in_speech:
            self._trim_before(self._buf_start + self._buf_len - self.keep_samples)
        return events

    def end_speech(self) -> list[InputEvent]:
        """The client stopped sending audio mid-speech (stall timeout): the speech ends where
        the audio did, or where the quiet already heard would have cut it, as if the user had
        gone quiet; the detector starts over."""
        if not self.in_speech:
            return []
        end = self._buf_start + self._buf_len
        events = self._force_stop(end if self._cut is None else self._cut, end)
        self._trim_before(end - self.keep_samples)
        return events

    def _force_stop(self, cut: int, at: Optional[int] = None) -> list[InputEvent]:
        """End the current speech without the detector: its audio up to `cut` is the turn."""
        audio = self._take_until(cut)
        heard = not (self._held or self._discard)
        self.in_speech = self._held = self._discard = False
        self._cut = None
        self._detector = self._factory(self.turn_detection)
        self._origin = self.samples_total
        return [SpeechStopped(cut if at is None else at, audio, forced=True)] if heard else []

    def _on_interrupt(self, ev: Heard) -> list[InputEvent]:
        out: list[InputEvent] = []
        if self.in_speech and (self._held or ev.reason == "command"):
            if ev.reason == "command":
                self._discard = True   # "stop omni" is not a question
            else:
                self._held = False     # the barge-in speech becomes the next turn
                out.append(SpeechStarted(self._buf_start))
        out.append(Interrupted(ev.reason, ev.phrase, self._origin + ev.sample, ev.played_ms, ev.audible))
        return out

    def commit(self) -> np.ndarray:
        """Manual commit: everything buffered becomes one turn; the detector starts over.

        The resampler's held-back tail (its filter delay, ~20-50 ms with libsoxr) is flushed
        into the turn first, so the turn ends where the user's audio did. With VAD and no
        speech under way it is left alone: the detector has not seen those samples.
        """
        if not self.vad or self.in_speech:
            tail = self._resampler.flush()
            if tail.size:
                self._append(tail)
        audio = self._take_until(self._buf_start + self._buf_len)
        self._cut = None
        if self.vad and self.in_speech:
            self.in_speech = False
            self._detector = self._factory(self.turn_detection)
            self._origin = self.samples_total
        return audio

    def clear(self) -> None:
        self._take_until(self._buf_start + self._buf_len)
        self.in_speech = False
        self._held = self._discard = False
        self._cut = None

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
        # Whole leading chunks go, the first kept one becomes a view: no copy. Joining the
        # buffer here cost a copy of idle_audio_keep_s (2 s) on every append of every session.
        drop = min(max(at - self._buf_start, 0), self._buf_len)
        self._buf_start += drop
        self._buf_len -= drop
        while drop:
            first = self._chunks[0]
            if first.size <= drop:
                del self._chunks[0]
                drop -= first.size
            else:
                self._chunks[0] = first[drop:]
                drop = 0

    def _peek_until(self, at: int) -> np.ndarray:
        """A copy of the buffered samples before absolute index `at` (the buffer keeps them)."""
        n = min(max(at - self._buf_start, 0), self._buf_len)
        return self._joined()[:n].copy()

    def _take_until(self, at: int) -> np.ndarray:
        """Remove and return buffered samples before absolute index `at`."""
        n = min(max(at - self._buf_start, 0), self._buf_len)
        buf = self._joined()
        taken, rest = buf[:n].copy(), buf[n:]
        self._chunks = [rest]
        self._buf_start += n
        self._buf_len -= n
        return taken
