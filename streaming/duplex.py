"""Per-session duplex controller: listens to the user while the assistant answers.

One DuplexController per session. The server feeds it every microphone packet
(`feed_input`) and every assistant audio chunk it sends (`feed_output`), tells it when an
answer starts and ends (`set_speaking`), and acts on what `feed_input` returns:

- VadEvent("speech_started" | "speech_stopped", sample): turn detection, on the
  echo-cancelled signal (OpenAI server-VAD semantics, see vad.py);
- Interrupt(kind="command" | "barge_in" | "model", ...): cancel the answer now.

Flow inside feed_input: microphone -> EchoCanceller (removes what the client is playing)
-> SpeechDetector in 32 ms chunks -> while the assistant is audible and the user speaks,
the CommandDetector decodes the latest window every `hop_ms`, and at once when a pause
starts (the usual end of a command). In barge-in mode any speech of `barge_in_ms` stops.

`feed_input` runs the recognizer inline (tens of ms on CPU): call it from a worker thread
(e.g. `await asyncio.to_thread(ctl.feed_input, pcm)`), never on the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Union

import numpy as np

from .audio import Resampler
from .echo import EchoCanceller, EchoConfig
from .interrupt import CommandConfig, CommandDetector
from .vad import CHUNK, SAMPLE_RATE, SpeechDetector, VadEvent

OUTPUT_RATE = 24000
Mode = Literal["command", "barge_in"]


@dataclass(frozen=True)
class DuplexConfig:
    """Every threshold of the listening side (one object per session)."""

    mode: Mode = "command"
    # Turn detection (OpenAI turn_detection.server_vad fields).
    vad_threshold: float = 0.5
    silence_ms: int = 500
    prefix_padding_ms: int = 300
    min_speech_ms: int = 64
    # Barge-in mode: user speech at least this long stops the answer.
    barge_in_ms: int = 300
    # Command mode: decoding schedule and window.
    command: CommandConfig = field(default_factory=CommandConfig)
    hop_ms: int = 200            # decode period while the user is speaking
    pause_prob: float = 0.3      # a chunk under this speech probability starts a pause
    min_gap_ms: int = 64         # no two decodes closer than this
    window_lead_ms: int = 200    # audio kept before the speech onset in a window
    min_window_ms: int = 400     # shorter speech cannot hold a two-word command
    # While the assistant is audible the echo residue raises the bar for speech.
    vad_threshold_playing: float = 0.5
    echo: EchoConfig = field(default_factory=EchoConfig)
    # Listen for interrupts only while an answer is being generated or still playing.
    listen_when_idle: bool = False
    # Model interrupt path: token ids the checkpoint emits on its text stream to stop
    # itself. Empty for the released Mini-Omni2 weights (they have none).
    model_interrupt_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in ("command", "barge_in"):
            raise ValueError(f"duplex mode must be 'command' or 'barge_in', got {self.mode!r}")
        if self.hop_ms < 32 or self.barge_in_ms < 0:
            raise ValueError("hop_ms must be >= 32 and barge_in_ms >= 0")


@dataclass(frozen=True)
class Interrupt:
    """Stop the current answer. at_sample: 16 kHz input sample where the decision fell."""

    kind: Literal["command", "barge_in", "model"]
    phrase: str | None
    confidence: float
    at_sample: int
    text: str = ""          # recognizer transcript of the window (command), for logs
    played_ms: int = 0      # assistant audio of this answer the client had played by then


DuplexEvent = Union[VadEvent, Interrupt]


class DuplexController:
    def __init__(self, config: DuplexConfig = DuplexConfig(), detector: CommandDetector | None = None):
        self.config = config
        self.vad = SpeechDetector(
            threshold=config.vad_threshold, silence_ms=config.silence_ms,
            prefix_padding_ms=config.prefix_padding_ms, min_speech_ms=config.min_speech_ms,
        )
        self.echo = EchoCanceller(config.echo)
        self.detector = None
        if config.mode == "command":
            self.detector = detector or CommandDetector(config.command)
        self._ms = SAMPLE_RATE // 1000
        self._tracing = False
        self.reset()

    def reset(self) -> None:
        """Forget the session's audio (sample indices restart at 0)."""
        self.vad.reset()
        self.echo.reset()
        self._resampler = Resampler(OUTPUT_RATE, SAMPLE_RATE)
        self._clean = np.zeros(0, dtype=np.float32)   # cleaned audio kept for windows
        self._clean_base = 0
        self._vad_pending = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self._answer_start: int | None = None  # playout sample where this answer starts
        self._segment_start: int | None = None
        self._speech_run = 0          # samples of speech in the current segment
        self._last_decode = -(1 << 30)
        self._was_voiced = False
        self._interrupted = False
        self.decodes = 0
        # Set to a list to record every decode as (end sample, transcript, confidence).
        self.trace: list | None = [] if self._tracing else None

    # ------------------------------------------------------------------ server inputs
    def set_speaking(self, speaking: bool) -> None:
        """An answer started (True) or finished generating (False; it may still play)."""
        if speaking and not self.speaking:
            self._answer_start = None
            self._interrupted = False
        self.speaking = bool(speaking)

    def feed_output(self, pcm_24k: np.ndarray) -> None:
        """Assistant audio just sent to the client (float32, 24 kHz)."""
        x = self._resampler.process(np.asarray(pcm_24k, dtype=np.float32))
        if x.size:
            start = self.echo.add_reference(x, self.echo.samples_in)
            if self._answer_start is None:
                self._answer_start = start

    def on_model_tokens(self, token_ids: Iterable[int]) -> Interrupt | None:
        """Text-stream tokens from the engine; honours model interrupt tokens if configured."""
        stop = set(self.config.model_interrupt_token_ids)
        if not stop or self._interrupted:
            return None
        for token in token_ids:
            if int(token) in stop:
                return self._interrupt("model", None, 1.0, self.echo.samples_in, "")
        return None

    def audible(self, at: int | None = None) -> bool:
        """Whether an answer is being generated or its audio is still playing at `at`."""
        at = self.echo.samples_in if at is None else at
        return self.speaking or self.echo.playout_end > at

    def played_ms(self, at: int | None = None) -> int:
        """Milliseconds of this answer's audio the client had played by sample `at`."""
        if self._answer_start is None:
            return 0
        at = self.echo.samples_in if at is None else at
        return max(0, min(at, self.echo.playout_end) - self._answer_start) // self._ms

    # -------------------------------------------------------------------- microphone
    def feed_input(self, samples_16k: np.ndarray) -> list[DuplexEvent]:
        """Process microphone audio (float32, 16 kHz, any length); events in order."""
        clean = self.echo.process(samples_16k)
        self._keep(clean)
        x = np.concatenate([self._vad_pending, clean]) if self._vad_pending.size else clean
        n = (x.size // CHUNK) * CHUNK
        self._vad_pending = x[n:].copy()
        events: list[DuplexEvent] = []
        for i in range(0, n, CHUNK):
            events += self._chunk(x[i : i + CHUNK])
        return events

    def _keep(self, clean: np.ndarray) -> None:
        self._clean = np.concatenate([self._clean, clean]) if self._clean.size else clean.copy()
        keep = int(self.config.command.window_s * SAMPLE_RATE) + self.config.window_lead_ms * self._ms + CHUNK
        if self._clean.size > 2 * keep:
            drop = self._clean.size - keep
            self._clean = self._clean[drop:]
            self._clean_base += drop

    def _chunk(self, chunk: np.ndarray) -> list[DuplexEvent]:
        cfg = self.config
        start = self.vad.samples_seen
        end = start + CHUNK
        playing = self.echo.playing(start, end)
        self.vad.threshold = cfg.vad_threshold_playing if playing else cfg.vad_threshold
        events: list[DuplexEvent] = list(self.vad.push(chunk))
        prob = self.vad.speech_prob_last
        voiced = prob >= self.vad.threshold
        if voiced and self._segment_start is None:
            # Decoding may begin before min_speech_ms confirms the onset.
            self._segment_start = max(0, start - cfg.window_lead_ms * self._ms)
            self._speech_run = 0
        if voiced:
            self._speech_run += CHUNK
        listening = (self.audible(end) or cfg.listen_when_idle) and not self._interrupted
        pause_started = self._was_voiced and prob < cfg.pause_prob
        self._was_voiced = voiced
        quiet = not (voiced or self.vad.in_speech or self.vad.onset_pending)
        if quiet:
            self._segment_start = None  # blip over or speech_stopped: next speech is new
        if not listening or self._segment_start is None:
            return events
        if cfg.mode == "barge_in":
            if self._speech_run >= cfg.barge_in_ms * self._ms:
                events.append(self._interrupt("barge_in", None, prob, end, ""))
            return events
        due = end - self._last_decode >= cfg.hop_ms * self._ms and (voiced or self.vad.in_speech)
        if (pause_started and end - self._last_decode >= cfg.min_gap_ms * self._ms) or due:
            hit = self._decode(end)
            if hit is not None:
                events.append(hit)
        return events

    def _decode(self, end: int) -> Interrupt | None:
        cfg = self.config
        if self._speech_run < cfg.min_window_ms * self._ms // 4:
            return None
        start = max(self._segment_start, end - int(cfg.command.window_s * SAMPLE_RATE), self._clean_base)
        if end - start < cfg.min_window_ms * self._ms:
            start = max(self._clean_base, end - cfg.min_window_ms * self._ms)
        window = self._clean[start - self._clean_base : end - self._clean_base]
        self._last_decode = end
        self.decodes += 1
        transcript, found, confidence = self.detector.score(window)
        if self.trace is not None:
            self.trace.append((end, transcript.text, round(confidence, 3)))
        if found is None or confidence < cfg.command.threshold:
            return None
        return self._interrupt("command", found.phrase, confidence, end, transcript.text)

    def _interrupt(self, kind, phrase, confidence, at, text) -> Interrupt:
        self._interrupted = True
        self.speaking = False
        played = self.played_ms(at)
        # The server cancels the turn and the client flushes its player at this point.
        self.echo.flush_reference(at)
        return Interrupt(kind, phrase, float(confidence), int(at), text, played)
