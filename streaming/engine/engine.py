"""The inference engine: many conversations, one model, one batched decode step at a time.

Threads: callers (any thread / the server's event loop) submit turns and cancel them; a
*prep* thread encodes questions (Whisper, CLIP, adapters) so the GPU step loop never waits
on an encoder; the *step* thread runs schedule -> execute -> update; the *vocoder* thread
turns frames into audio. The step loop:
  1. admit prepared turns into their session's slot, apply cancellations;
  2. prefill chunks of the admitted prompts, several in one call, as many positions as the
     frame leaves after the decode step (prefill.py: answers in flight keep their frames);
  3. run ONE decode step for every speaking slot (rows 0..2*hi), sample, apply end rules,
     hand new text to the turn and new frames to the vocoder.
The prep thread encodes the questions waiting together as one batch where that pays (prefill.py).
One device->host copy per step (the sampled ids of all rows); nothing per row.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
import traceback
from typing import Optional

import torch

from omni2.model import tokens as tk
from omni2.model.bundle import OmniModel
from omni2.model.generate import max_steps_for

from ..audio import MODEL_SAMPLE_RATE
from .admission import FRAME_S, FirstAudioHeadroom, StepHeadroom
from .collector import freeze_long_lived
from .config import EngineConfig
from .executor import ModelExecutor
from .host import HostPolicy
from .prefill import EncodeBatch, PrefillBudget
from .messages import (STOPPED_REASONS, ContextTruncated, EngineBusy, EngineFull, Forget, TextDelta, Turn, TurnDone,
                       TurnRequest)
from .slots import DECODE, FORGET_PARTS, HELD, IDLE, IDLE_IDS, PREFILL, REBUILD, Slot, feed_ids
from .vocoder import Vocoder


class Engine:
    """The scheduler: sessions, admission, cancels, prefill chunks, decode steps, end rules. The
    model's side of each step is the executor's (executor.py); by default a ModelExecutor of
    `model` on the device's host policy (host.py)."""

    def __init__(self, model: Optional[OmniModel], config: EngineConfig = EngineConfig(),
                 host: Optional[HostPolicy] = None, executor=None) -> None:
        if executor is None:
            executor = ModelExecutor(model, config, host if host is not None else host_policy(model.device, config, model_width(model)))
        self.executor = executor
        self.model = executor.model
        self.config = config
        self.host = executor.host
        self.context_len = executor.context_len
        self.slots = [Slot(i) for i in range(config.max_sessions)]
        self._sessions: dict[str, Slot] = {}
        self._session_ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _sessions / slot ownership / queue admission
        self._prep: "queue.Queue[Turn]" = queue.Queue()
        self._ready: "collections.deque[tuple[Turn, torch.Tensor]]" = collections.deque()
        self._queued = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.vocoder = Vocoder(executor.snac, config.audio_group_frames, on_first_audio=self._first_audio,
                               threads=self.host.vocoder_threads, window_frames=config.audio_window_frames or None,
                               batch_frames=config.audio_batch_frames)
        # counters / recent timings (read by stats(); appended by the step thread)
        w = config.timing_window
        self.step_seconds: collections.deque = collections.deque(maxlen=w)
        self.step_sessions: collections.deque = collections.deque(maxlen=w)  # speaking slots per step
        self.ttfa_seconds: collections.deque = collections.deque(maxlen=w)
        self.counters = collections.Counter()
        self.headroom = (StepHeadroom(config.step_budget_share, retry_after_s=config.busy_retry_after_s,
                                      fit=config.batched_arrivals)
                         if config.step_budget_share > 0 else None)
        self.first_audio = (FirstAudioHeadroom(config.first_audio_factor, retry_after_s=config.busy_retry_after_s)
                            if config.first_audio_factor > 0 else None)
        self._starting: dict[int, tuple[Turn, int]] = {}  # answers without audio yet: (turn, starting at submit)
        batched = config.batched_arrivals
        self.prefill_budget = PrefillBudget(
            self.headroom.budget_s if self.headroom is not None and batched else None,
            most=config.prefill_step_positions if batched else config.prefill_chunk,
            least=min(config.prefill_min_positions, config.prefill_step_positions) if batched else 1,
            chunk=config.prefill_chunk, turns=config.prefill_turns if batched else 1)
        self._order = itertools.count()  # prompts are prefilled oldest first
        self.encode_batch = EncodeBatch(config.encode_batch if batched else 1)

    @property
    def cache(self):
        return self.executor.cache

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self.config.freeze_long_lived:
            freeze_long_lived()
        self.vocoder.start()
        loops = [("omni2-prep", self._prep_loop), ("omni2-step", self._step_loop)]
        job = self.host.housekeeping()
        if job is not None:
            loops.append(("omni2-trim", lambda: self._housekeeping_loop(*job)))
        for name, target in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop the threads; every turn still in flight gets its TurnDone (cancelled)."""
        self._stop.set()
        self._wake.set()
        self._prep.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.vocoder.stop()
        orphans = [s.turn for s in self.slots if s.turn is not None] + [t for t, _ in self._ready]
        orphans += [t for s in self.slots for t, _ in s.waiting]
        while True:
            try:
                t = self._prep.get_nowait()
            except queue.Empty:
                break
            if t is not None:
                orphans.append(t)
        for turn in orphans:
            if isinstance(turn, Turn) and not turn.done:
                turn._emit(TurnDone(reason="cancelled", frames_generated=0, frames_emitted=0, text="",
                                    error="engine stopped"))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- sessions ----------------------------------------------------------------------------
    def open_session(self) -> str:
        with self._lock:
            free = [s for s in self.slots if s.session is None]
            if not free:
                raise EngineFull(f"all {len(self.slots)} session slots are in use")
            sid = f"sess_{next(self._session_ids)}"
            free[0].session = sid
            free[0].ctx = 0
            free[0].records = []
            self._sessions[sid] = free[0]
            self.counters["sessions_opened"] += 1
        return sid

    def close_session(self, session_id: str) -> None:
        with self._lock:
            slot = self._sessions.pop(session_id, None)
        if slot is None:
            return
        if slot.turn is not None:
            slot.turn.cancel()
        slot.closing = True
        self._wake.set()

    def submit(self, request: TurnRequest) -> Turn:
        """Queue a question; returns its Turn at once. A session's live turn is cancelled
        first (one answer at a time per conversation); a turn with answer=False (context
        only) waits for it instead."""
        if request.audio_16k is None and request.text is None:
            raise ValueError("a turn needs speech (audio_16k) or text ('' asks from the context alone)")
        if request.role != "user" and (request.answer or request.audio_16k is not None or request.image):
            raise ValueError(f"a {request.role} turn is text that joins the context (answer=False)")
        with self._lock:
            slot = self._sessions.get(request.session_id)
            if slot is None:
                raise ValueError(f"unknown session {request.session_id!r}")
            if self._queued >= self.config.max_queued_turns:
                raise EngineFull(f"{self._queued} turns already waiting")
            if self.headroom is not None and request.answer:  # (context-only turns speak no frames)
                live = self._live_answers()
                replaces = slot.turn is not None and slot.phase != IDLE
                decision = self.headroom.decide(live, live if replaces else live + 1)
                if not decision.admit:
                    self.counters["refused_busy"] += 1
                    raise EngineBusy.refused(decision)
            turn = Turn(request)
            starting = self._count_starting(but=slot.turn)
            turn.found = {"playing": sum(s.phase == DECODE for s in self.slots), "live": self._live_answers(),
                          "starting": starting}
            if self.first_audio is not None and request.answer and not request.hold:
                # (a held turn's audio counts from release)
                decision = self.first_audio.decide(starting)
                if not decision.admit:
                    self.counters["refused_busy"] += 1
                    self.counters["refused_first_audio"] += 1
                    raise EngineBusy.refused(decision)
                self._starting[turn.id] = (turn, starting + 1)
                turn._ended = lambda: self._no_first_audio(turn)  # (one that ends without audio counts no more)
            self._queued += 1
        if slot.turn is not None and request.answer:
            slot.turn.cancel()
        turn._poke = self._wake.set
        self._prep.put(turn)
        return turn

    def forget(self, session_id: str, turn_id: int, part: str = "all", keep_steps: int = 0) -> None:
        """Remove a past turn (or its "prompt" / "answer") from the session's context, in
        order with the turns submitted before and after (see messages.Forget). A live turn
        is cancelled first by its owner; an unknown turn id is ignored. part "answer" with
        keep_steps: keep the answer's first decode steps (what the user heard of it:
        snac_layout.steps_heard), forget the rest."""
        if part not in FORGET_PARTS:
            raise ValueError(f"part must be one of {FORGET_PARTS}, got {part!r}")
        if keep_steps and part != "answer":
            raise ValueError("keep_steps applies to part='answer' only")
        self._prep.put(Forget(session_id, turn_id, part, keep_steps))

    def _live_answers(self) -> int:
        """Answers speaking, prefilling, held, or waiting to be (caller holds the lock)."""
        return sum(s.phase != IDLE for s in self.slots) + self._queued

    def _count_starting(self, but: Optional[Turn] = None) -> int:
        """Answers submitted that have no audio yet and still run, `but` aside (caller holds the lock)."""
        for tid in [tid for tid, (t, _) in self._starting.items() if t.done or t.cancel_requested]:
            del self._starting[tid]
        return sum(t is not but for t, _ in self._starting.values())

    def overloaded(self) -> bool:
        """The answers live now already miss the step budget: new sessions are turned away."""
        if self.headroom is None:
            return False
        with self._lock:
            live = self._live_answers()
        return self.headroom.overloaded(live)

    def stats(self) -> dict:
        with self._lock:
            live = [s for s in self.slots if s.phase != IDLE]
            return {
                "free_slots": sum(s.session is None for s in self.slots),
                "sessions": len(self._sessions),
                "live_turns": len(live),
                "queued_turns": self._queued,
                "steps_total": self.counters["steps"],
                "step_seconds": list(self.step_seconds),
                "ttfa_seconds": list(self.ttfa_seconds),
                "cancels_total": self.counters["cancels"],
                "errors_total": self.counters["errors"],
                "turns_total": self.counters["turns"],
                "refused_busy_total": self.counters["refused_busy"],
                "refused_first_audio_total": self.counters["refused_first_audio"],
                **{f"vocoder_{k}_total": v for k, v in self.vocoder.counters.items()},
            }

    @property
    def name(self) -> str:
        return self.model.name

    # ---- prep thread: encoders run here, never in the step loop ------------------------------
    def _prep_loop(self) -> None:
        while not self._stop.is_set():
            items = [self._prep.get()]
            batch = self.encode_batch.size()  # (prefill.py: one at a time where a batch does not pay)
            while len(items) < batch and items[-1] is not None:  # what waits too joins the batch
                try:
                    items.append(self._prep.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            self._prepare([t for t in items if t is not None])
            if stop:
                return

    def _prepare(self, items: list) -> None:
        """Encode the turns among `items` in one batch; hand every item on in its order."""
        turns = [t for t in items if isinstance(t, Turn) and not t.cancel_requested]
        try:
            t0 = time.perf_counter()
            encoded = self.executor.encode([t.request for t in turns]) if turns else []
            if turns:
                end = time.perf_counter()
                self.encode_batch.observe(end - t0, len(turns), end)
        except Exception as exc:  # never let one bad batch kill the engine
            traceback.print_exc()
            encoded = [RuntimeError(f"{type(exc).__name__}: {exc}")] * len(turns)
        embeds = {id(t): e for t, e in zip(turns, encoded)}
        done_at = time.perf_counter()
        for t in turns:
            t.stamps.setdefault("encoded", done_at)
        for item in items:
            if isinstance(item, Forget):  # no encoding; keeps its place in the order
                self._ready.append((item, None))
            elif id(item) not in embeds:
                self._finish_unstarted(item, "cancelled")
            elif isinstance(embeds[id(item)], Exception):  # a bad question (ValueError) or batch
                self._finish_unstarted(item, "error", str(embeds[id(item)]))
            else:
                self._ready.append((item, embeds[id(item)]))
        self._wake.set()

    def _housekeeping_loop(self, interval_s: float, job) -> None:
        """The host's periodic job (a CPU: the heap's free pages back to the kernel)."""
        while not self._stop.wait(interval_s):
            job()

    def _finish_unstarted(self, turn: Turn, reason: str, error: Optional[str] = None) -> None:
        with self._lock:
            self._queued -= 1
        if reason == "error":
            self.counters["errors"] += 1
        turn._emit(TurnDone(reason=reason, frames_generated=0, frames_emitted=0, text="", error=error))

    # ---- step thread -------------------------------------------------------------------------
    def _step_loop(self) -> None:
        self.host.enter_step_thread()
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    busy = self._schedule()
                    prefill = self._plan_prefill()
                    if prefill:
                        self._prefill(prefill)
                    speaking = [s for s in self.slots if s.phase == DECODE]
                    if speaking:
                        self._decode_step(speaking)
                    if not (busy or prefill or speaking):
                        self._wake.wait(0.05)
                        self._wake.clear()
                except Exception:  # a bug must not wedge every session: fail live turns, go on
                    traceback.print_exc()
                    self._fail_live_turns()

    def _fail_live_turns(self) -> None:
        self.counters["errors"] += 1
        for s in self.slots:
            if s.phase == REBUILD:  # keep what was re-prefilled; the rest of the context is lost
                s.end_rebuild()
            if s.phase == IDLE:
                continue
            turn = s.turn
            try:
                self._finish(s, "error", error="internal engine error")
            except Exception:  # the turn's own state is what broke: end it bluntly
                traceback.print_exc()
                s.end_turn()
                turn._emit(TurnDone(reason="error", frames_generated=0, frames_emitted=0, text="",
                                    error="internal engine error"))

    def _schedule(self) -> bool:
        """Admit prepared turns and apply cancels/closes/edits at this step boundary."""
        busy = False
        for s in self.slots:
            if s.turn is not None and s.turn.cancel_requested:
                self._finish(s, "cancelled")
            elif s.phase == HELD and not s.turn.held:  # released: speak now
                busy = True
                self._start_decode(s, *s.first)
            if s.closing and s.phase == IDLE:
                with self._lock:
                    s.release()
                    s.closing = False
                self._drop_waiting(s)
        while self._ready:
            item, embeds = self._ready.popleft()
            busy = True
            with self._lock:
                slot = self._sessions.get(item.session_id if isinstance(item, Forget) else item.request.session_id)
            if slot is not None:
                slot.waiting.append((item, embeds))
            elif isinstance(item, Turn):
                self._dequeued()
                item._emit(TurnDone(reason="cancelled", frames_generated=0, frames_emitted=0, text=""))
        for s in self.slots:
            if s.waiting and self._advance(s):
                busy = True
        return busy

    def _advance(self, slot: Slot) -> bool:
        """Start what waits for this slot, in order, as far as the slot allows: a question
        replaces the live answer (barge-in); context-only turns and edits wait for it."""
        started = False
        while slot.waiting:
            item, embeds = slot.waiting[0]
            if isinstance(item, Turn) and item.cancel_requested:
                slot.waiting.popleft()
                self._dequeued()
                item._emit(TurnDone(reason="cancelled", frames_generated=0, frames_emitted=0, text=""))
                continue
            if slot.turn is not None and slot.turn.request.answer and any(
                    isinstance(t, Turn) and t.request.answer for t, _ in slot.waiting):
                self._finish(slot, "cancelled")  # a newer question replaces the live answer
            if slot.phase != IDLE:
                return started
            slot.waiting.popleft()
            started = True
            if isinstance(item, Forget):
                replay = self.executor.forget(slot, item.turn_id, item.part, item.keep_steps)
                if replay is not None:
                    slot.begin_rebuild(replay)
                    slot.order = next(self._order)
                continue
            self._dequeued()
            self._admit(slot, item, embeds)
        return started

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _drop_waiting(self, slot: Slot) -> None:
        """The slot's session closed: what waited for it never runs."""
        while slot.waiting:
            item, _ = slot.waiting.popleft()
            if isinstance(item, Turn):
                self._dequeued()
                item._emit(TurnDone(reason="cancelled", frames_generated=0, frames_emitted=0, text=""))

    def _admit(self, slot: Slot, turn: Turn, embeds: torch.Tensor) -> None:
        T = int(embeds.shape[1])
        req = turn.request
        try:
            if T >= self.context_len:
                raise ValueError(f"question of {T} positions does not fit the {self.context_len}-position context")
            want = min(req.max_steps or self.config.max_steps, self.config.max_steps) if req.answer else 0
            turns_before = len(slot.records)
            dropped = self.executor.make_room(slot, T + want)
            max_steps = max_steps_for(self.context_len, slot.ctx + T, want)
        except ValueError as exc:
            self.counters["errors"] += 1
            turn._emit(TurnDone(reason="error", frames_generated=0, frames_emitted=0, text="", error=str(exc)))
            return
        if dropped:
            turn._emit(ContextTruncated(dropped_positions=dropped,
                                        dropped_turns=turns_before - len(slot.records)))
        self.executor.set_sampling(slot.index, req.sampling)
        slot.begin(turn, embeds, max_steps, self.executor.tokenizer.incremental())
        turn.stamps.setdefault("admitted", time.perf_counter())
        slot.order = next(self._order)
        self.counters["turns"] += 1
        self.vocoder.open(turn)

    def _plan_prefill(self) -> list[tuple[Slot, int, int]]:
        """This step's prefill chunks (slot, a, b): prefill.py's budget and plan."""
        waiting = sorted((s for s in self.slots if s.phase in (PREFILL, REBUILD)), key=lambda s: s.order)
        if not waiting:
            return []
        playing = sum(s.phase == DECODE for s in self.slots)
        decode_s = self.headroom.predict(playing) if playing and self.headroom is not None else None
        plan = self.prefill_budget.plan([(s, s.prompt_len - s.prefilled) for s in waiting],
                                        self.prefill_budget.positions(decode_s))
        return [(s, s.prefilled, s.prefilled + n) for s, n in plan]

    def _prefill(self, chunks: list[tuple[Slot, int, int]]) -> None:
        t0 = time.perf_counter()
        last = self.executor.prefill(chunks)
        ends, first = [], []
        for (slot, _, b), hidden in zip(chunks, last):
            slot.prefilled = b
            slot.written = slot.start + b
            if b == slot.prompt_len and slot.phase == PREFILL and slot.turn.request.answer:
                first.append((slot, hidden))  # step 0 comes from the prompt's last position
            elif b == slot.prompt_len:
                ends.append(slot)
        if first:
            audio, text = self.executor.sample(torch.cat([h for _, h in first]), [s for s, _ in first])
        end = time.perf_counter()
        cost = max(b - a for _, a, b in chunks) * len(chunks)  # the padded positions computed
        self.prefill_budget.observe(end - t0, cost, end)
        for slot, _, _ in chunks:
            slot.prefill_s += end - t0
        for slot in ends:
            if slot.phase == REBUILD:
                slot.end_rebuild()
            else:  # context only: nothing to say
                self._finish(slot, "completed")
        for j, (slot, _) in enumerate(first):
            slot.embeds = None
            if slot.turn.held:  # speculative: nothing is said before release()
                slot.phase, slot.first = HELD, (audio[j], text[j])
                continue
            self._start_decode(slot, audio[j], text[j])

    def _start_decode(self, slot: Slot, audio: list[int], text: int) -> None:
        slot.phase, slot.first = DECODE, None
        slot.decode_started_at = time.perf_counter()
        slot.turn.stamps.setdefault("decoding", slot.decode_started_at)
        self._update(slot, audio, text)

    def _decode_step(self, speaking: list[Slot]) -> None:
        t0 = time.perf_counter()
        hi = max(s.index for s in speaking) + 1
        if self.config.compile:  # few distinct shapes: rows to a power of two
            hi = min(1 << (hi - 1).bit_length(), len(self.slots))
        ids, pos = [], []
        live = {s.index for s in speaking}
        for s in self.slots[:hi]:
            p = min(s.position, self.context_len)
            ids.extend(s.next_ids if s.index in live else IDLE_IDS)
            pos.extend((p, p))
        span = max(pos) + 1
        if self.config.compile or self.host.bucket_span:  # the span to a bucket: few shapes to compile,
            b = self.config.compile_span_bucket    # and cuDNN's attention plans are reused (config)
            span = min(-(-span // b) * b, self.context_len + 1)
        hidden = self.executor.decode(ids, pos, span)
        audio, text = self.executor.sample(hidden, self.slots[:hi])
        self.counters["steps"] += 1
        for s in speaking:
            s.written = s.position + 1
            s.records[-1].fed.append(s.next_ids)  # what this step wrote, to replay it elsewhere
            self._update(s, audio[s.index], text[s.index])
        end = time.perf_counter()
        self.step_seconds.append(end - t0)
        self.step_sessions.append(len(speaking))
        if self.headroom is not None:
            self.headroom.observe(end - t0, len(speaking), end)

    def _update(self, slot: Slot, audio: list[int], text: int) -> None:
        stop, text = slot.rules.apply(slot.step, audio, text)
        if stop:
            self._finish(slot, "completed")
            return
        if text in self.executor.interrupt_ids:  # the model heard "stop" itself
            self._finish(slot, "interrupted")
            return
        slot.text_ids.append(text)
        if self.config.record_tokens:
            slot.audio_ids.append(audio)
        delta = slot.text_decoder.push(text)
        if delta:
            slot.turn._emit(TextDelta(delta))
        frame = slot.assembler.push(audio)
        if frame is not None:
            slot.n_frames += 1
            slot.frames.append(frame)
            if len(slot.frames) >= self.config.audio_group_frames:
                slot.turn.stamps.setdefault("frames", time.perf_counter())
                self.vocoder.frames(slot.turn, torch.stack(slot.frames))
                slot.frames = []
        slot.next_ids = feed_ids(audio, text)
        slot.step += 1
        if slot.step >= slot.max_steps:
            self._finish(slot, "max_steps")

    def _finish(self, slot: Slot, reason: str, error: Optional[str] = None) -> None:
        turn = slot.turn
        if turn is None:
            return
        stopped = reason in STOPPED_REASONS
        if slot.frames and not stopped:
            self.vocoder.frames(turn, torch.stack(slot.frames))
        slot.frames = []
        tail = slot.text_decoder.flush() if slot.text_decoder is not None and not stopped else ""
        if tail:
            turn._emit(TextDelta(tail))
        now = time.perf_counter()
        decode_s = now - slot.decode_started_at if slot.phase == DECODE else 0.0
        steps = slot.step
        stats = {
            "prompt_positions": slot.prompt_len,
            "context_start": slot.start,
            "steps": steps,
            "prefill_s": slot.prefill_s,
            "decode_s": decode_s,
            "steps_per_s": steps / decode_s if decode_s > 0 else 0.0,
            # real-time factor: compute time per second of speech produced (< 1 keeps up)
            "real_time_factor": (decode_s / (steps * FRAME_S)) if steps else 0.0,
        }
        if self.config.record_tokens:
            stats.update(text_ids=list(slot.text_ids), audio_ids=list(slot.audio_ids))
        text = self.executor.tokenizer.decode_answer(slot.text_ids)
        if stopped:
            self.counters["cancels"] += 1
        if reason == "error":
            self.counters["errors"] += 1
        slot.prefill_s = 0.0
        if turn.held or not turn.request.keep:  # an unused speculation, an out-of-band answer
            slot.forget_turn()
        else:
            slot.end_turn()
        self.vocoder.finish(turn, TurnDone(reason=reason, frames_generated=slot_frames(steps),
                                           frames_emitted=0, text=text, stats=stats, error=error))

    def _no_first_audio(self, turn: Turn) -> None:
        with self._lock:
            self._starting.pop(turn.id, None)

    def _first_audio(self, turn: Turn, seconds: float) -> None:
        turn.stamps.setdefault("first_audio", turn.started_at + seconds)
        self.ttfa_seconds.append(seconds)
        with self._lock:
            entry = self._starting.pop(turn.id, None)
        if entry is not None and self.first_audio is not None:
            self.first_audio.observe(seconds, entry[1], time.perf_counter())

    def warmup(self, seconds: float = 1.0, steps: int = 8) -> None:
        """Short turns end to end (encoders, prefill, decode, vocoder), then forget them. Two
        answers of different lengths when there are two slots: the batched encoder and prefill
        run, and admission's step-cost fit sees one and two answers a step from the start."""
        import numpy as np

        sids = [self.open_session() for _ in range(min(2, len(self.slots)))]
        slots = [self._sessions[sid] for sid in sids]
        try:
            t = np.arange(int(MODEL_SAMPLE_RATE * seconds)) / MODEL_SAMPLE_RATE
            speech = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            turns = [self.submit(TurnRequest(session_id=sid, audio_16k=speech, max_steps=max(1, steps >> k)))
                     for k, sid in enumerate(sids)]
            for turn in turns:
                for _ in turn.events(timeout=300):
                    pass
        finally:
            for sid in sids:
                self.close_session(sid)
        deadline = time.monotonic() + 10  # their slots are let go at the next step boundary
        while any(s.session is not None for s in slots) and time.monotonic() < deadline and self._threads:
            time.sleep(0.005)


def host_policy(device, config: EngineConfig, width: Optional[int] = None) -> HostPolicy:
    """A CPU's policy on a CPU (streaming/cpu/policy.py; `width`: the model's, which sets its
    threads), else the GPU's: nothing to arrange."""
    if torch.device(device).type != "cpu":
        return HostPolicy()
    from ..cpu.policy import CpuPolicy

    return CpuPolicy(config.threads, config.malloc_arena_max, config.malloc_trim_interval_s, width=width)


def model_width(model) -> Optional[int]:
    """The LM's hidden width: its config's n_embd (a model without a config: its head's input;
    None: neither)."""
    lm = getattr(model, "lm", None)
    width = getattr(getattr(lm, "cfg", None), "n_embd", None)
    if width is not None:
        return int(width)
    head = getattr(lm, "lm_head", None)
    return int(head.weight.shape[-1]) if head is not None else None


def slot_frames(steps: int) -> int:
    """Speech frames a turn of `steps` kept steps produced (delay pattern: 7 steps of lag)."""
    return max(0, steps - tk.N_AUDIO_LAYERS)
