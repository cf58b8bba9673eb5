"""What every listener of a session's microphone is to the server: one interface, one event.

A `Detector` turns 16 kHz microphone audio into `Heard` events. Two kinds exist: the plain
speech detector (vad.SpeechDetector: OpenAI server-VAD, the session decides what speech
does to an answer) and the duplex controller (duplex.DuplexController: it also hears what
the assistant plays, cancels that echo, and itself decides when the answer stops). The
server drives both the same way and never asks which one it holds:

    chunks = det.prepare_input(pcm_16k)          # whole 512-sample chunks for the VAD
    probs = vad.score_streams([det.stream, ...], [chunks, ...])   # batched across sessions
    for event in det.consume_input(chunks, probs): ...
    det.feed_input(pcm_16k)                      # the three above for one detector alone

and, for the answer it plays, `set_speaking` / `feed_output` / `audible` / `may_decode`,
which a detector that does not listen to the answer leaves as the no-ops below.
`decides_interrupts` is the one thing the server reads to tell them apart in behaviour:
True means the detector emits "interrupt" events and the session must not stop an answer
on plain speech itself.

Sample positions in events count 16 kHz samples from the detector's construction (or its
last reset); the server adds its own origin.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

HeardKind = Literal["speech_started", "speech_paused", "speech_resumed", "speech_stopped", "interrupt"]
InterruptReason = Literal["command", "barge_in", "model"]


@dataclass(frozen=True)
class Heard:
    """One thing a detector heard.

    kind "speech_started" / "speech_stopped" / "speech_paused" / "speech_resumed": turn
    detection (OpenAI server-VAD semantics, see vad.py); `sample` is where the turn's audio
    begins / ends. kind "interrupt": stop the current answer now; `sample` is where the
    decision fell and the fields below say why and how much of the answer was heard.
    """

    kind: HeardKind
    sample: int
    reason: Optional[InterruptReason] = None   # interrupt: "command" | "barge_in" | "model"
    phrase: Optional[str] = None     # interrupt: the command phrase matched
    confidence: float = 0.0          # interrupt: how sure the deciding check was
    text: str = ""                   # interrupt: recognizer transcript of the window, for logs
    played_ms: int = 0               # interrupt: answer audio the client had played by then
    audible: bool = True             # interrupt: an answer was generated or still playing then


class Detector(ABC):
    """A session's microphone listener (see the module note for how the server drives it)."""

    #: The detector stops answers itself (emits "interrupt") and wants the assistant's audio.
    decides_interrupts: bool = False

    @property
    @abstractmethod
    def stream(self):
        """The vad.SileroStream its chunks are scored with (vad.score_streams); not imported
        here, as vad.py imports this module."""

    @abstractmethod
    def prepare_input(self, samples_16k: np.ndarray) -> np.ndarray:
        """Take microphone audio (float32, 16 kHz, any length); the whole chunks (k x 512) it
        completes, for the VAD to score. A tail shorter than a chunk waits for more."""

    @abstractmethod
    def consume_input(self, chunks: np.ndarray, probs) -> list[Heard]:
        """The chunks from prepare_input with their speech probabilities -> events, in order."""

    @abstractmethod
    def feed_input(self, samples_16k: np.ndarray) -> list[Heard]:
        """prepare_input, a score of its own (no batch), consume_input."""

    # ---- the answer being played (no-ops for a detector that does not listen to it) ----------
    def set_speaking(self, speaking: bool) -> None:
        """An answer started (True) or finished generating (False; it may still play)."""

    def feed_output(self, pcm_24k: np.ndarray) -> None:
        """Assistant audio just sent to the client (float32, 24 kHz): the echo reference."""

    def audible(self, at: Optional[int] = None) -> bool:
        """Whether an answer is being generated or still playing at sample `at`."""
        return False

    def may_decode(self) -> bool:
        """Whether the next audio may run slow work (a command decode: tens of ms of CPU)."""
        return False
