"""Messages between the server and the engine: plain data, no tensors cross this line.

The server builds a `TurnRequest` per answer; the engine streams `TurnEvent`s back through
the `Turn` handle it returns. A `Turn` is safe to read from asyncio and to cancel from any
thread; the engine thread is the only writer.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .config import DEFAULT_MAX_STEPS


@dataclass(frozen=True)
class SamplingParams:
    """Greedy (temperature 0 or top_k 1) reproduces the released model exactly."""

    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class TurnRequest:
    """One question: speech (16 kHz mono float32), optionally with an image (encoded bytes)."""

    session_id: str
    audio_16k: Optional[np.ndarray] = None
    image: Optional[bytes] = None
    text: Optional[str] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_steps: int = DEFAULT_MAX_STEPS
    # Speculative turn: encode and prefill now, but say nothing until `Turn.release()`;
    # cancelled before release, it leaves no trace in the session's context.
    hold: bool = False
    # False: the prompt only joins the session's context (nothing is said; TurnDone right
    # after its prefill). Such a turn waits for a live answer instead of replacing it.
    answer: bool = True
    # Whose words `text` is: "user" (a question: speech, image, text; text "" is the minimal
    # question), or, with answer=False, "assistant" (what it said) or "system".
    role: str = "user"
    # False: out-of-band answer, forgotten once done (the context is as if it never came).
    keep: bool = True


@dataclass(frozen=True)
class Forget:
    """Remove a past turn, or part of it, from the session's context: part "all", "prompt"
    (the question) or "answer" (what was said). Later turns are re-prefilled where they now
    sit, so the next answer sees the context as if the removed part had never been there."""

    session_id: str
    turn_id: int
    part: str = "all"
    keep_steps: int = 0   # part "answer": its first decode steps stay (what the user heard)


@dataclass(frozen=True)
class AudioChunk:
    """Decoded speech, float32 mono at 24 kHz, in playback order."""

    pcm: np.ndarray
    frames: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ContextTruncated:
    """The session's context window filled; its oldest `dropped_turns` whole turns (question
    and answer; `dropped_positions` cache positions) were forgotten."""

    dropped_positions: int
    dropped_turns: int = 0


@dataclass(frozen=True)
class TurnDone:
    """Last event of every turn. reason: 'completed' | 'max_steps' | 'cancelled' | 'error' |
    'interrupted' (the model wrote one of its checkpoint's interrupt tokens)."""

    reason: str
    frames_generated: int
    frames_emitted: int
    text: str
    stats: dict = field(default_factory=dict)
    error: Optional[str] = None


# Reasons after which the answer's unsent audio and text are dropped, not flushed.
STOPPED_REASONS = frozenset({"cancelled", "interrupted"})


class EngineFull(RuntimeError):
    """No slot (or queue space) for another session/turn right now: try again later. (Here,
    not in engine.py, so that the server recognises it without importing torch.)"""

    retry_after_s: Optional[float] = None


class EngineBusy(EngineFull):
    """No step-time headroom for another answer (streaming/engine/admission.py): try again
    after `retry_after_s`. decision: the admission.Decision that refused it, where there is
    one (the engine's own; a gateway re-raising it from the wire has only reason and hint)."""

    def __init__(self, reason: str, retry_after_s: Optional[float] = None, decision=None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.decision = decision

    @classmethod
    def refused(cls, decision) -> "EngineBusy":
        """The refusal an admission.Decision (admit False) stands for."""
        return cls(decision.reason(), decision.retry_after_s, decision)


TurnEvent = Union[AudioChunk, TextDelta, ContextTruncated, TurnDone]

_turn_ids = itertools.count(1)


def _nothing() -> None:
    pass


class Turn:
    """Handle on one answer in flight: read its events, or cancel it.

    Events are put by the engine thread with `_emit`; readers use `get` (threads) or
    `async for` (asyncio). The queue is bounded by the engine's own pacing: it emits at most
    one audio chunk per decode group, and a turn whose reader vanished is cancelled by the
    server, so nothing here grows without limit.
    """

    def __init__(self, request: TurnRequest) -> None:
        self.id = next(_turn_ids)
        self.request = request
        self.submitted_at = time.perf_counter()
        self.started_at = self.submitted_at   # latency figures count from here (or release)
        # perf_counter time each stage of its start was reached, set once by the engine:
        # "encoded" (encoder done), "admitted" (in its slot), "decoding" (prefill done, step 0
        # sampled), "frames" (first frames to the vocoder), "first_audio" (first chunk out)
        self.stamps: dict[str, float] = {}
        self.found: dict[str, int] = {}       # the engine's load at submission (answers playing, starting)
        self._events: "queue.SimpleQueue[TurnEvent]" = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._release = threading.Event()
        self._poke = _nothing                 # the engine's wake-up, set when it takes the turn
        self._ended = _nothing                # the engine's bookkeeping, run at TurnDone
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    # ---- engine side -------------------------------------------------------------------
    def _emit(self, event: TurnEvent) -> None:
        if isinstance(event, TurnDone):
            self._ended()  # (before a reader can see the TurnDone)
        self._events.put(event)
        if isinstance(event, TurnDone):
            self._done.set()
        with self._lock:
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed: its reader is gone
                pass

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # ---- reader side -------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this turn at its next step boundary. Idempotent."""
        self._cancel.set()
        self._poke()

    def release(self) -> None:
        """Let a held (speculative) turn speak; latency figures restart from now. Idempotent;
        a no-op for a turn that was not held."""
        if not self._release.is_set():
            self.started_at = time.perf_counter()
            self._release.set()
        self._poke()

    @property
    def held(self) -> bool:
        """Submitted with hold=True and not released yet."""
        return self.request.hold and not self._release.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def get(self, timeout: Optional[float] = None) -> TurnEvent:
        return self._events.get(timeout=timeout)

    def events(self, timeout: Optional[float] = None):
        """Blocking iterator over all events up to and including TurnDone."""
        while True:
            ev = self.get(timeout=timeout)
            yield ev
            if isinstance(ev, TurnDone):
                return

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, wake))
        try:
            while True:
                try:
                    ev = self._events.get_nowait()
                except queue.Empty:
                    wake.clear()
                    # re-check after clear: an emit between get_nowait and clear would be lost
                    try:
                        ev = self._events.get_nowait()
                    except queue.Empty:
                        await wake.wait()
                        continue
                yield ev
                if isinstance(ev, TurnDone):
                    return
        finally:
            with self._lock:
                self._waiters.remove((loop, wake))
