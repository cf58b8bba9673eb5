"""Event-loop lag: how late the gateway's asyncio loop wakes a timer.

Every session's events, audio pacing and VAD hand-offs run on one loop per process; when
callbacks hog it, everything waits. A task sleeps `PERIOD_S` again and again and records
how much later than asked it woke (`omni2_event_loop_lag_seconds` in /metrics), which is the
delay any event of any session saw at that moment. Started with the first session.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

PERIOD_S = 0.05
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class LoopLag:
    def __init__(self, histogram, period_s: float = PERIOD_S):
        self.histogram = histogram
        self.period_s = period_s
        self._task: Optional[asyncio.Task] = None

    def ensure_started(self) -> None:
        """Start measuring on the running loop (once; again if that loop went away)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.histogram.observe(max(0.0, time.perf_counter() - asked - self.period_s))
