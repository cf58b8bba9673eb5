"""Streaming voice activity detection with silero-vad.

The model comes from the `silero-vad` wheel, which carries its TorchScript file, so it
works offline. silero-vad scores fixed 512-sample chunks at 16 kHz (32 ms) and keeps its
recurrent state and 64-sample context inside the scripted module, so every
SpeechDetector owns one module instance while it lives: sessions must never share recurrent
state.

A loaded module costs ~7.5 MB of C heap (weights plus the TorchScript executor's optimized
graphs) and holds reference cycles, so a dropped one is freed only by Python's full garbage
collection, which a server with ~400k live objects runs rarely: a server that loaded one per
session (two when the client sets turn_detection) kept hundreds of MB of dead modules waiting
(issue 19's soak). So modules are pooled: `SpeechDetector.close()` resets its module and hands
it back to `SileroPool`, the next detector takes it, and the pool keeps at most `max_idle`
idle ones (the server sets its `max_sessions`). Live modules are thus at most the detectors
open at once; `loaded` counts every module ever loaded.

Events follow the OpenAI Realtime server-VAD semantics the server exposes:
`speech_started.sample` is the onset minus `prefix_padding_ms` (the start of the audio a
turn would include), `speech_stopped.sample` is where `silence_ms` of quiet was reached
(the end of the audio a turn would include). Both are absolute 16 kHz sample indices
counted from construction or the last `reset()`.

With `pause_ms` set (below `silence_ms`), two more events let a server work ahead:
`speech_paused` when a quiet run inside speech reaches `pause_ms` (its sample is where the
quiet run reached that length: audio up to it is all a turn needs), and `speech_resumed`
when speech comes back before `speech_stopped`. A `speech_stopped` is always preceded by a
`speech_paused` of the same quiet run when pausing is on.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

SAMPLE_RATE = 16000
# silero-vad v5+ accepts exactly this chunk size at 16 kHz.
CHUNK = 512

VadKind = Literal["speech_started", "speech_stopped", "speech_paused", "speech_resumed"]


@dataclass(frozen=True)
class VadEvent:
    kind: VadKind
    sample: int


class VadModelError(RuntimeError):
    """silero-vad is missing or its model file cannot be loaded."""


def silero_model_path() -> str:
    """Path of the TorchScript model inside the installed silero-vad wheel.

    Found through the import spec rather than `import silero_vad`, because importing that
    package calls torch.set_num_threads(1) for the whole process, which would slow the
    engine sharing it.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadModelError("silero-vad is not installed: pip install silero-vad")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.jit")
    if not os.path.isfile(path):
        raise VadModelError(f"silero-vad is installed but its model file is missing: {path}")
    return path


def load_silero():
    """A fresh silero-vad TorchScript module (each carries its own recurrent state)."""
    import torch

    path = silero_model_path()
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 flags jit.load as deprecated; the wheel ships no other torch format
            # that keeps the recurrent state inside the module.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # a damaged wheel: say which file, not a TorchScript trace
        raise VadModelError(f"cannot load silero-vad model {path}: {exc}") from None
    model.eval()
    return model


class SileroPool:
    """Loaded silero modules for reuse (thread-safe): a detector takes one and gives it back."""

    def __init__(self, max_idle: int = 16):
        self.max_idle = max_idle
        self.loaded = 0          # modules ever loaded
        self._idle: list = []
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        model = load_silero()
        with self._lock:
            self.loaded += 1
        return model

    def release(self, model) -> None:
        model.reset_states()  # no recurrent state crosses to the next owner
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(model)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


_POOL = SileroPool()


def silero_pool() -> SileroPool:
    """The process's pool (the server bounds its idle modules by max_sessions)."""
    return _POOL


class SpeechDetector:
    """Turns a stream of 16 kHz float32 samples into speech start/stop events.

    threshold: speech probability at or above which a chunk counts as speech.
    silence_ms: quiet needed after speech before `speech_stopped`.
    prefix_padding_ms: audio before the detected onset that `speech_started.sample`
        includes (so a turn does not clip the first phoneme).
    min_speech_ms: speech needed before `speech_started` fires; shorter blips (clicks,
        breaths) are ignored. The reported sample is still the onset of the blip run.
    neg_threshold: probability below which a chunk counts as silence once in speech;
        between the two thresholds the state is kept (hysteresis against flicker).
    pause_ms: quiet after speech that reports `speech_paused` (None or >= silence_ms: off).
    pool: where its silero module comes from and goes back to on `close()` (the process's).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        silence_ms: int = 500,
        prefix_padding_ms: int = 300,
        min_speech_ms: int = 64,
        neg_threshold: float | None = None,
        pause_ms: int | None = None,
        pool: SileroPool | None = None,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {threshold}")
        if silence_ms < 0 or prefix_padding_ms < 0 or min_speech_ms < 0:
            raise ValueError("VAD durations must be >= 0 ms")
        self.threshold = float(threshold)
        self.neg_threshold = (
            max(self.threshold - 0.15, 0.01) if neg_threshold is None else float(neg_threshold)
        )
        self.silence_samples = silence_ms * SAMPLE_RATE // 1000
        self.prefix_samples = prefix_padding_ms * SAMPLE_RATE // 1000
        self.min_speech_samples = min_speech_ms * SAMPLE_RATE // 1000
        self.pause_samples = None
        if pause_ms is not None and pause_ms < silence_ms:
            if pause_ms < 0:
                raise ValueError("VAD durations must be >= 0 ms")
            self.pause_samples = pause_ms * SAMPLE_RATE // 1000
        self._pool = pool or _POOL
        self._model = self._pool.acquire()
        self.reset()

    def _live_model(self):
        if self._model is None:
            raise RuntimeError("this SpeechDetector is closed")
        return self._model

    def close(self) -> None:
        """Hand the module back to the pool (idempotent); the detector is unusable after."""
        model, self._model = self._model, None
        if model is not None:
            self._pool.release(model)

    def reset(self) -> None:
        """Forget all audio: sample indices restart at 0, recurrent state cleared."""
        self._live_model().reset_states()
        self._pending = np.zeros(0, dtype=np.float32)
        self.samples_seen = 0          # samples scored so far (multiple of CHUNK)
        self.speech_prob_last = 0.0
        self.in_speech = False
        self._onset: int | None = None  # first sample of a speech run not yet confirmed
        self._last_speech_end = 0       # end sample of the last chunk scored as speech
        self._last_stop = 0             # started.sample never reaches back before this
        self._quiet_from: int | None = None  # first sample of the current quiet run in speech
        self._paused = False            # speech_paused reported for the current quiet run

    @property
    def onset_pending(self) -> bool:
        """Speech chunks seen but not yet long enough for `speech_started`."""
        return self._onset is not None

    @property
    def last_speech_end(self) -> int:
        """End sample of the most recent chunk scored as speech (for end-of-speech timing)."""
        return self._last_speech_end

    def push(self, samples_16k: np.ndarray) -> list[VadEvent]:
        """Score the new audio and return the events it caused, in order.

        Any length is accepted; a tail shorter than one chunk waits for the next push.
        """
        x = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        if self._pending.size:
            x = np.concatenate([self._pending, x])
        n_full = (x.size // CHUNK) * CHUNK
        self._pending = x[n_full:].copy()
        events: list[VadEvent] = []
        if n_full == 0:
            return events
        import torch

        model = self._live_model()
        chunks = torch.from_numpy(np.ascontiguousarray(x[:n_full])).view(-1, CHUNK)
        with torch.inference_mode():
            for chunk in chunks:
                prob = float(model(chunk, SAMPLE_RATE))
                start = self.samples_seen
                self.samples_seen += CHUNK
                self.speech_prob_last = prob
                self._step(prob, start, events)
        return events

    def _step(self, prob: float, start: int, events: list[VadEvent]) -> None:
        end = start + CHUNK
        if not self.in_speech:
            if prob >= self.threshold:
                if self._onset is None:
                    self._onset = start
                self._last_speech_end = end
                if end - self._onset >= max(self.min_speech_samples, 1):
                    self.in_speech = True
                    begin = max(self._onset - self.prefix_samples, self._last_stop, 0)
                    events.append(VadEvent("speech_started", begin))
                    self._onset = None
            elif prob < self.neg_threshold:
                self._onset = None  # the run was a blip: drop it
            return
        if prob >= self.threshold:
            self._last_speech_end = end
            self._quiet_from = None
            if self._paused:
                self._paused = False
                events.append(VadEvent("speech_resumed", start))
            return
        if prob < self.neg_threshold and self._quiet_from is None:
            self._quiet_from = start
        # Chunks between the thresholds neither start nor cancel a quiet run (hysteresis),
        # so murmur after a word does not keep the turn open forever.
        if self._quiet_from is None:
            return
        if self.pause_samples is not None and not self._paused and end - self._quiet_from >= self.pause_samples:
            self._paused = True
            events.append(VadEvent("speech_paused", end))
        if end - self._quiet_from >= self.silence_samples:
            self.in_speech = False
            self._quiet_from = None
            self._paused = False
            self._last_stop = end
            events.append(VadEvent("speech_stopped", end))
