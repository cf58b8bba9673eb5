"""The bounded queue of server events waiting to be written to one socket.

A reader that stops reading must not make the server buffer without limit: `put` waits
while the queue is full, and gives up (`SlowReader`) after `stall_timeout_s`, at which point
the connection is closed. Cancelling a response removes its audio deltas still queued, so
speech stops the moment the user interrupts rather than after the backlog drains.
"""
from __future__ import annotations

import asyncio
import collections
import json
from typing import Optional

from .events import to_beta

AUDIO_DELTA = "response.output_audio.delta"


class SlowReader(Exception):
    """The client has not read its events for too long."""


class Outbox:
    def __init__(self, limit: int, stall_timeout_s: float, beta_names: bool = False):
        self.limit = limit
        self.stall_timeout_s = stall_timeout_s
        self.beta_names = beta_names
        self._queue: collections.deque[dict] = collections.deque()
        self._changed = asyncio.Condition()
        self.closed = False
        self.sent = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def put(self, event: dict) -> None:
        if self.closed:
            return
        async with self._changed:
            if len(self._queue) >= self.limit:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: len(self._queue) < self.limit or self.closed),
                        self.stall_timeout_s)
                except asyncio.TimeoutError:
                    raise SlowReader(f"client did not read {self.limit} queued events "
                                     f"for {self.stall_timeout_s:.0f} s") from None
            if self.closed:
                return
            self._queue.append(event)
            self._changed.notify_all()

    async def get(self) -> Optional[dict]:
        """Next event, or None once closed and drained."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._queue or self.closed)
            if not self._queue:
                return None
            event = self._queue.popleft()
            self._changed.notify_all()
            return event

    def encode(self, event: dict) -> str:
        if self.beta_names:
            event = to_beta(event)
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)

    async def drop_audio(self, response_id: str) -> list[dict]:
        """Remove queued audio deltas of `response_id`; returns the removed events."""
        async with self._changed:
            kept: collections.deque[dict] = collections.deque()
            dropped = []
            for e in self._queue:
                if e["type"] == AUDIO_DELTA and e.get("response_id") == response_id:
                    dropped.append(e)
                else:
                    kept.append(e)
            self._queue = kept
            if dropped:
                self._changed.notify_all()
            return dropped

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()
