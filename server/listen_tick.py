"""One listening pass per tick for every session of a server process.

Each session's microphone appends used to take their own worker-thread hand-off and their
own silero-vad calls (one per 32 ms chunk per session): at a few dozen sessions that was
most of a process's CPU. Here a session's append waits for the next tick; the tick takes
every append that arrived since the last one and, in one worker-thread call, decodes and
echo-cancels each (InputAudio.begin_push), scores all their VAD chunks in one batched
network call per 32 ms step (vad.score_streams), and turns each session's probabilities into
its events (InputAudio.end_push). A session's appends stay in order (it awaits each).

`tick_ms` bounds how often a pass runs (appends wait up to that long to share it); 0 runs a
pass as soon as the previous one is done with whatever arrived meanwhile. A session that is
behind (its next append came right after the last one was answered: its socket holds a
backlog) does not wait for the tick, so it catches up at pass speed.

While every waiting session is quiet (no speech under way, no answer under way:
InputAudio.lively) the passes run at the slower `quiet_ms` instead: a pass costs mostly per
pass, not per session (one batched silero call, cold caches after the sleep), so an idle room
of sessions pays for ~10 passes a second instead of ~33. Decisions are the same (the events
come from the samples, not from when a pass runs); what it costs is when a quiet session hears
speech start: up to quiet_ms - tick_ms later (70 ms at 100 / 30). A lively session's append
ends a quiet wait at once, so the end of a turn and a barge-in keep the fast tick.

The pass runs on one thread of the tick's own (`PassThread`), not the event loop's default
executor: the executor's hand-off (its submit lock and work item, a concurrent Future chained
to an asyncio one, any of several idle threads waking) cost about a tenth of a gateway's
listening CPU at ~33 passes a second, and one thread keeps its stack warm.

A session whose listener may decode a spoken command now (command mode while an answer is
audible: tens of ms of whisper per decode) is listened to on a worker thread of its own, as
before the batch, so one session's decode never holds up every other session's listening.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from typing import Optional

_ticks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ListenTick]" = weakref.WeakKeyDictionary()


def listen_tick(tick_ms: int, quiet_ms: Optional[int] = None) -> "ListenTick":
    """The ListenTick of the running event loop (one per server process)."""
    loop = asyncio.get_running_loop()
    tick = _ticks.get(loop)
    if tick is None:
        tick = _ticks[loop] = ListenTick(tick_ms, quiet_ms)
    return tick


class ListenTick:
    def __init__(self, tick_ms: int = 30, quiet_ms: Optional[int] = None):
        self.tick_s = max(0, tick_ms) / 1000.0
        self.quiet_s = max(self.tick_s, (tick_ms if quiet_ms is None else quiet_ms) / 1000.0)
        self._lively = False        # a waiting append comes from a lively session: the fast tick
        self._queue: list = []
        self._wake: Optional[asyncio.Future] = None  # the idle pass loop waits on it
        self._cut: Optional[asyncio.Future] = None   # the tick's wait, cut short by an urgent append
        self._task: Optional[asyncio.Task] = None
        self._thread = PassThread()
        self._last = 0.0
        self._urgent = False
        self._done_at: dict[int, float] = {}   # id(InputAudio) -> when its last append was answered
        self.passes = 0             # listening passes run
        self.appends = 0            # appends they took

    async def push(self, audio, data: bytes) -> list:
        """InputAudio.push(data), done in the next tick's shared pass."""
        if audio.may_decode:
            return await asyncio.to_thread(audio.push, data)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((audio, data, fut))
        if time.monotonic() - self._done_at.get(id(audio), 0.0) < BEHIND_S:
            self._urgent = True
            _resolve(self._cut)
        elif not self._lively and audio.lively:
            self._lively = True
            _resolve(self._cut)     # a quiet wait: cut it to the fast tick
        _resolve(self._wake)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="listen-tick")
        return await fut

    async def _run(self) -> None:
        # Plain futures and one timer handle per pass (no task, no wait_for): at ~33 passes a
        # second in every gateway process, the pass's own overhead is a per-session cost.
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            while not self._urgent:
                wait = self._last + (self.tick_s if self._lively else self.quiet_s) - time.monotonic()
                if wait <= 0.0005:
                    break
                self._cut = loop.create_future()
                timer = loop.call_later(wait, _resolve, self._cut)
                await self._cut      # the tick, an urgent append (a session catching up) or a lively one
                timer.cancel()
                self._cut = None
            self._urgent = self._lively = False
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self._last = time.monotonic()
            results = await self._thread.run(loop, listen_pass, [(a, d) for a, d, _ in batch])
            self.passes += 1
            self.appends += len(batch)
            for (audio, _, fut), result in zip(batch, results):
                self._settle(audio, fut, result)
            if len(self._done_at) > 4 * len(batch) + 1024:
                self._done_at.clear()

    def _settle(self, audio, fut, result) -> None:
        self._done_at[id(audio)] = time.monotonic()
        if fut.done():
            return
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)


BEHIND_S = 0.01


class PassThread:
    """One worker thread for the listening passes: a call in, its result back on the loop.

    Started at the first call; after IDLE_S without one it ends (a server process without
    sessions keeps no thread waiting), and the next call starts it again.
    """

    IDLE_S = 10.0

    def __init__(self) -> None:
        self._calls: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive = False
        self.started = 0            # threads started (tests)

    @property
    def alive(self) -> bool:
        return self._alive

    def run(self, loop: asyncio.AbstractEventLoop, fn, arg) -> asyncio.Future:
        """fn(arg) on the pass thread; the returned future (of `loop`) gets its result."""
        fut = loop.create_future()
        with self._lock:
            self._calls.put((loop, fut, fn, arg))
            if not self._alive:
                self._alive = True
                self.started += 1
                threading.Thread(target=self._serve, name="omni2-listen", daemon=True).start()
        return fut

    def _serve(self) -> None:
        while True:
            try:
                loop, fut, fn, arg = self._calls.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():
                        self._alive = False
                        return
                continue
            try:
                result, error = fn(arg), None
            except BaseException as exc:  # handed to the awaiting task
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle_future, fut, result, error)
            except RuntimeError:  # the loop closed meanwhile: nobody waits
                pass


def _settle_future(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _resolve(fut: Optional[asyncio.Future]) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def listen_pass(items: list) -> list:
    """[(InputAudio, bytes)] -> each one's events (or the exception it raised), with one
    batched VAD score for all."""
    from omni2.streaming.listening.vad import score_streams

    out: list = [None] * len(items)
    works = []
    for i, (audio, data) in enumerate(items):
        try:
            works.append((i, audio, audio.begin_push(data)))
        except Exception as exc:  # e.g. a cut PCM16 sample: that session's error only
            out[i] = exc
    scored = [(i, a, w) for i, a, w in works if w.chunks is not None and w.chunks.shape[0]]
    probs = score_streams([a.vad_stream for _, a, _ in scored], [w.chunks for _, _, w in scored]) if scored else []
    by_index = {i: p for (i, _, _), p in zip(scored, probs)}
    for i, audio, work in works:
        try:
            out[i] = audio.end_push(work, by_index.get(i))
        except Exception as exc:
            out[i] = exc
    return out
