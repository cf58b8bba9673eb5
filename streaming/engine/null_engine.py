"""The null engine: the real engine's surface (streaming/ENGINE_API.md) at no model cost.

`omni2 serve --model null` serves it, so that benchmarks (`omni2 bench gateway`) measure the
server's own cost per session; the server tests use it as their fake engine. It answers at a
set rate and never touches a tensor.

One step-loop thread, like the real engine: every `tick_s` each live turn gets one 24 kHz
sine AudioChunk, and every `words_every` ticks one word of its answer as a TextDelta. The
answer names the session and what the turn carried, so tests can check that every session
got its own answer. Cancel is honoured at the next tick; submitting past `slots` live turns
raises EngineFull; a turn with no input or an undecodable image raises ValueError. A held
(speculative) turn stays silent until released.

Context: `context[sid]` lists (turn id, label) of what the model would remember, in order
(context-only turns at once, answered turns with their answer, out-of-band ones never;
`forget` removes them), and `prompts` what each answered turn's prompt held (context + its
own question), so tests can check that a deleted item is gone from the next prompt.
"""
from __future__ import annotations

import io
import itertools
from collections import deque
import threading
import time
from typing import Optional

import numpy as np

from omni2.streaming.audio import MODEL_SAMPLE_RATE, REALTIME_SAMPLE_RATE
from omni2.streaming.engine.messages import (AudioChunk, ContextTruncated, EngineFull, TextDelta, Turn, TurnDone,
                                             TurnRequest)

RECORDS = 1024  # requests, prompts, forgets and truncations kept for inspection (the newest)


class NullEngine:
    def __init__(self, slots: int = 4, tick_s: float = 0.05, words_every: int = 2,
                 answer_words: int = 8, tone_hz: float = 440.0, chunk_s: float | None = None,
                 noise: bool = False, context_turns: Optional[int] = None):
        self.slots = slots
        self.tick_s = tick_s
        self.words_every = words_every
        self.answer_words = answer_words
        self.tone_hz = tone_hz
        self.chunk_s = chunk_s or tick_s   # audio per chunk (> tick_s: faster than real time)
        self.noise = noise                 # white noise: incompressible on the wire
        self.context_turns = context_turns  # window: a new answer drops older turns beyond it
        self._rng = np.random.default_rng(0)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._sessions: dict[str, Optional[Turn]] = {}
        self._live: dict[Turn, dict] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.steps_total = 0
        self.cancels_total = 0
        # what tests inspect, kept for the newest RECORDS events only: `bench gateway` runs the
        # null engine for minutes, and an unbounded list would be the server's memory growth
        self.submitted: deque[TurnRequest] = deque(maxlen=RECORDS)
        self.step_seconds: list[float] = []
        self.context: dict[str, list[tuple[int, str]]] = {}
        self.prompts: deque[list[str]] = deque(maxlen=RECORDS)
        self.forgotten: deque[tuple[str, int, str]] = deque(maxlen=RECORDS)
        self.truncations: deque[tuple[str, int, int]] = deque(maxlen=RECORDS)  # (session, turn id, steps kept)
        self._after_finish: dict[int, list[str]] = {}

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> "NullEngine":
        self._thread = threading.Thread(target=self._loop, name="null-engine", daemon=True)
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
            self.context[sid] = []
        return sid

    def close_session(self, sid: str) -> None:
        with self._lock:
            turn = self._sessions.pop(sid, None)
            self.context.pop(sid, None)
        if turn is not None:
            turn.cancel()

    def submit(self, request: TurnRequest) -> Turn:
        if request.audio_16k is None and request.text is None and request.image is None:
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
            if not request.answer:  # context only: remembered at once, nothing said
                turn = Turn(request)
                self.submitted.append(request)
                self.context[request.session_id].append((turn.id, self.label(request)))
                turn._emit(TurnDone(reason="completed", frames_generated=0, frames_emitted=0, text="",
                                    stats={"steps": 0, "prompt_positions": 3, "context_start": 0}))
                return turn
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
            context = self.context[request.session_id]
            dropped = len(context) - self.context_turns + 1 if self.context_turns is not None else 0
            if dropped > 0:
                del context[:dropped]
                turn._emit(ContextTruncated(dropped_positions=10 * dropped, dropped_turns=dropped))
            self.prompts.append([label for _, label in context] + [self.label(request)])
        return turn

    def forget(self, sid: str, turn_id: int, part: str = "all", keep_steps: int = 0) -> None:
        """As the real engine orders it: a live turn is forgotten once it has ended. A cut
        answer (keep_steps) is only recorded in `truncations`: the fake keeps whole labels."""
        if keep_steps:
            self.truncations.append((sid, turn_id, keep_steps))
            return
        with self._lock:
            self.forgotten.append((sid, turn_id, part))
            if any(t.id == turn_id for t in self._live):
                self._after_finish.setdefault(turn_id, []).append(part)
                return
            self._forget(sid, turn_id, part)

    def _forget(self, sid: str, turn_id: int, part: str) -> None:
        if sid not in self.context:  # closed: nothing left to forget
            return
        kept = []
        for tid, label in self.context.get(sid, []):
            if tid == turn_id and part != "all":
                question, _, answer = label.partition(" -> ")
                label = answer if part == "prompt" else question
                kept.append((tid, label))
            elif tid != turn_id:
                kept.append((tid, label))
        self.context[sid] = kept

    @staticmethod
    def label(request: TurnRequest) -> str:
        """What a turn puts in the context: user:<what it carried>, or role:text."""
        if request.role != "user":
            return f"{request.role}:" + "_".join(request.text.split())
        what = []
        if request.audio_16k is not None:
            what.append(f"{request.audio_16k.size / MODEL_SAMPLE_RATE:.1f}s-audio")
        if request.text:
            what.append("text=" + "_".join(request.text.split()))
        if request.image is not None:
            what.append("image")
        return "user:" + ("+".join(what) or "nothing")

    def _answer(self, request: TurnRequest) -> list[str]:
        words = [f"answer-for-{request.session_id}", "about", self.label(request)[len("user:"):]]
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
            n = int(REALTIME_SAMPLE_RATE * self.chunk_s)
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
                t = (st["phase"] + np.arange(n)) / REALTIME_SAMPLE_RATE
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
            context = self.context.get(turn.request.session_id)  # None: the session was closed
            if turn.request.keep and context is not None:
                answer = "_".join("".join(st["text"]).split())
                context.append(
                    (turn.id, f"{self.label(turn.request)} -> assistant:{answer}"))
            for part in self._after_finish.pop(turn.id, []):
                self._forget(turn.request.session_id, turn.id, part)
        turn._emit(TurnDone(reason=reason, frames_generated=st["step"], frames_emitted=st["step"],
                            text="".join(st["text"]),
                            stats={"steps": st["step"], "prompt_positions": 10, "context_start": 0}))
