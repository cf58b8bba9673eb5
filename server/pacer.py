"""Paced output: an answer's audio leaves the server at most `lead_s` ahead of its playback.

The engine writes speech faster than it plays. Sent as fast as it is written, a 20 s answer
would sit in the client's player after 4 s, and the server could only guess what the user
heard; a cancel or truncate would then stop nothing the client already holds. The pacer keeps
a model of the client's player: `play_end`, the moment the audio sent so far finishes playing
at real time (a player that ran dry resumes when the next audio arrives). A chunk goes out as
soon as it would end at most `lead_s` from now, so the first `lead_s` of an answer leaves at
once (time to first audio is unchanged) and the rest follows playback, one timer per answer
that wakes when the next chunk becomes due. What is still held here when the answer is
cancelled was never sent: `drop` forgets it.

Only audio is held. Text and lifecycle events go straight to the outbox (the transcript may
run ahead of the speech), except the closing events, which wait for `drained()` so that
`response.output_audio.done` still follows the answer's last delta.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Awaitable, Callable, Generic, TypeVar

Item = TypeVar("Item")


class PlayoutClock:
    """When audio sent to a real-time player finishes playing; pure (clock passed in)."""

    def __init__(self, lead_s: float) -> None:
        self.lead_s = lead_s
        self.play_end = float("-inf")

    def ahead(self, now: float) -> float:
        """Seconds of sent audio not yet played at `now`."""
        return max(0.0, self.play_end - now)

    def due_at(self, seconds: float) -> float:
        """The earliest moment a chunk of `seconds` may go: when it would end `lead_s` ahead; a
        chunk longer than the lead goes when the player runs empty (not later: waiting for it
        to end only `lead_s` ahead would leave the player silent for `seconds - lead_s`)."""
        return self.play_end + min(0.0, seconds - self.lead_s)

    def may_send(self, seconds: float, now: float) -> bool:
        # A chunk longer than the lead still goes once the player is empty.
        return now >= self.due_at(seconds) or self.ahead(now) == 0.0

    def sent(self, seconds: float, now: float) -> None:
        self.play_end = max(self.play_end, now) + seconds


async def _closed(item) -> None:
    raise RuntimeError("the pacer was closed: its answer is over")


class AudioPacer(Generic[Item]):
    """Holds an answer's audio items and hands them to `send` at playback pace (see above).

    `lead_s <= 0` turns pacing off (every item is sent at once)."""

    def __init__(self, lead_s: float, send: Callable[[Item], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.playout = PlayoutClock(lead_s)
        self.paced = lead_s > 0
        self._send = send
        self._held: collections.deque[tuple[Item, float]] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.Task | None = None
        self._error: Exception | None = None

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held_seconds(self) -> float:
        return sum(s for _, s in self._held)

    async def push(self, item: Item, seconds: float) -> None:
        """Send `item` (`seconds` of audio) now if it is due and nothing waits before it,
        else hold it for the answer's timer."""
        if not self._held and (not self.paced or self.playout.may_send(seconds, self.clock())):
            await self._emit(item, seconds)
            return
        self._held.append((item, seconds))
        self._idle.clear()
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._run(), name="audio pacer")

    async def _emit(self, item: Item, seconds: float) -> None:
        self.playout.sent(seconds, self.clock())
        await self._send(item)

    async def _run(self) -> None:
        try:
            while self._held:
                item, seconds = self._held[0]
                wait = self.playout.due_at(seconds) - self.clock()
                if wait > 0 and self.playout.ahead(self.clock()) > 0:
                    await asyncio.sleep(wait)
                    continue
                # kept at the head while it is sent, so a push meanwhile queues behind it
                await self._emit(item, seconds)
                if self._held and self._held[0][0] is item:
                    self._held.popleft()
        except Exception as exc:  # e.g. SlowReader: the answer's driver hears it in drained()
            self._error = exc
            self._held.clear()
        finally:
            self._idle.set()

    async def drained(self) -> None:
        """Wait until every held item was sent (or dropped); raises what failed a send."""
        await self._idle.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """The answer is over: forget what is held and the `send` callback (an owner's bound
        method, i.e. a reference cycle that only Python's full collection would free)."""
        self.drop()
        self._send = _closed

    def drop(self) -> list[tuple[Item, float]]:
        """Forget the held items (never sent); returns them with their seconds."""
        dropped = list(self._held)
        self._held.clear()
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
        self._idle.set()
        return dropped
