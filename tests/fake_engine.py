"""A stand-in engine with the real engine's surface (streaming/ENGINE_API.md), for server tests.

One step-loop thread, like the real engine: every `tick_s` each live turn gets one 24 kHz
sine AudioChunk, and every `words_every` ticks one word of its answer as a TextDelta. The
answer names the session and what the turn carried, so tests can check that every session
got its own answer. Cancel is honoured at the next tick; submitting past `slots` live turns
raises EngineFull; a turn with no input or an undecodable image raises ValueError. A held
(speculative) turn stays silent until released.
"""
from __future__ import annotations

import io
import itertools
import threading
import time
from typing import Optional

import numpy as np

from omni2.streaming.messages import AudioChunk, TextDelta, Turn, TurnDone, TurnRequest

try:
    from omni2.streaming.engine import EngineFull
except ImportError:  # the real engine is not written yet
    class EngineFull(RuntimeError):
        """No slot can take this turn."""

SAMPLE_RATE = 24000


class FakeEngine:
    def __init__(self, slots: int = 4, tick_s: float = 0.05, words_every: int = 2,
                 answer_words: int = 8, tone_hz: float = 440.0, chunk_s: float | None = None,
                 noise: bool = False):
        self.slots = slots
        self.tick_s = tick_s
        self.words_every = words_every
        self.answer_words = answer_words
        self.tone_hz = tone_hz
        self.chunk_s = chunk_s or tick_s   # audio per chunk (> tick_s: faster than real time)
        self.noise = noise                 # white noise: incompressible on the wire
        self._rng = np.random.default_rng(0)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sessions: dict[str, Optional[Turn]] = {}
        self._live: dict[Turn, dict] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.steps_total = 0
        self.cancels_total = 0
        self.submitted: list[TurnRequest] = []
        self.truncations: list[tuple[str, Turn, int]] = []
        self.step_seconds: list[float] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "FakeEngine":
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()
        return self

    def warmup(self) -> None:
        pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)

    # ---- sessions and turns ---------------------------------------------------------------
    def open_session(self) -> str:
        sid = f"s{next(self._ids)}"
        with self._lock:
            self._sessions[sid] = None
        return sid

    def close_session(self, sid: str) -> None:
        with self._lock:
            turn = self._sessions.pop(sid, None)
        if turn is not None:
            turn.cancel()

    def submit(self, request: TurnRequest) -> Turn:
        if request.audio_16k is None and not request.text and request.image is None:
            raise ValueError("a turn needs audio, text or an image")
        if request.audio_16k is not None and request.audio_16k.size == 0:
            raise ValueError("empty audio")
        if request.image is not None:
            from PIL import Image
            try:
                Image.open(io.BytesIO(request.image)).load()
            except Exception as exc:
                raise ValueError(f"undecodable image: {exc}") from None
        with self._lock:
            if request.session_id not in self._sessions:
                raise ValueError(f"unknown session {request.session_id}")
            old = self._sessions[request.session_id]
            if old is not None and not old.done:
                old.cancel()  # barge-in: the new turn replaces the live one
            live = sum(1 for t in self._live if not t.cancel_requested)
            if live >= self.slots:
                raise EngineFull(f"all {self.slots} slots are busy")
            turn = Turn(request)
            self._sessions[request.session_id] = turn
            self._live[turn] = {"step": 0, "words": self._answer(request), "text": [], "phase": 0.0}
            self.submitted.append(request)
        return turn

    def truncate_answer(self, sid: str, turn: Turn, steps: int) -> None:
        """Recorded (session, turn, steps) for tests: the fake keeps no context."""
        self.truncations.append((sid, turn, steps))

    def _answer(self, request: TurnRequest) -> list[str]:
        what = []
        if request.audio_16k is not None:
            what.append(f"{request.audio_16k.size / 16000:.1f}s-audio")
        if request.text:
            what.append("text=" + "_".join(request.text.split()))
        if request.image is not None:
            what.append("image")
        words = [f"answer-for-{request.session_id}", "about", "+".join(what)]
        filler = ["the", "sky", "is", "blue", "today", "and", "tomorrow", "again"]
        while len(words) < self.answer_words:
            words.append(filler[len(words) % len(filler)])
        return words

    def stats(self) -> dict:
        with self._lock:
            live = sum(1 for t in self._live if not t.done)
        return {"free_slots": max(0, self.slots - live), "live_turns": live, "queued_turns": 0,
                "sessions": len(self._sessions), "steps_total": self.steps_total,
                "step_seconds": list(self.step_seconds[-64:]), "ttfa_seconds": [],
                "cancels_total": self.cancels_total, "errors_total": 0}

    # ---- step loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            n = int(SAMPLE_RATE * self.chunk_s)
            t0 = time.perf_counter()
            with self._lock:
                turns = list(self._live.items())
            for turn, st in turns:
                if turn.cancel_requested:
                    self.cancels_total += 1
                    self._finish(turn, st, "cancelled")
                    continue
                if turn.held:  # speculative: silent until released
                    continue
                if st["step"] >= turn.request.max_steps:
                    self._finish(turn, st, "max_steps")
                    continue
                t = (st["phase"] + np.arange(n)) / SAMPLE_RATE
                st["phase"] += n
                pcm = (self._rng.uniform(-0.5, 0.5, n) if self.noise
                       else 0.3 * np.sin(2 * np.pi * self.tone_hz * t))
                turn._emit(AudioChunk(pcm=pcm.astype(np.float32), frames=1))
                st["step"] += 1
                if st["step"] % self.words_every == 0:
                    i = len(st["text"])
                    if i < len(st["words"]):
                        delta = (" " if i else "") + st["words"][i]
                        st["text"].append(delta)
                        turn._emit(TextDelta(delta))
                    else:
                        self._finish(turn, st, "completed")
            self.steps_total += 1
            self.step_seconds.append(time.perf_counter() - t0)
            del self.step_seconds[:-256]
            self._stop.wait(max(0.0, self.tick_s - (time.perf_counter() - t0)))

    def _finish(self, turn: Turn, st: dict, reason: str) -> None:
        with self._lock:
            self._live.pop(turn, None)
        turn._emit(TurnDone(reason=reason, frames_generated=st["step"], frames_emitted=st["step"],
                            text="".join(st["text"]),
                            stats={"steps": st["step"], "prompt_positions": 10, "context_start": 0}))
