"""turn_detection.idle_timeout_ms: prompt the user after a long quiet, as OpenAI does.

The quiet is measured on the input audio's own clock (16 kHz samples received), so the
`audio_start_ms` / `audio_end_ms` of input_audio_buffer.timeout_triggered are offsets into
the audio the client sent, as the API defines them, and no timer runs beside the session: a
client that streams its microphone (what idle timeouts are for) moves the clock. It starts
when the last answer's audio has played (the answer's end plus what was still unplayed),
or when the setting is applied; speech or a new answer stop it.
"""
from __future__ import annotations

import time
from typing import Optional

from .input_audio import RATE


class IdleTimeout:
    def __init__(self) -> None:
        self.since: Optional[int] = 0            # sample from which the quiet counts (None: off)

    def arm(self, at: int) -> None:
        self.since = at

    def disarm(self) -> None:
        self.since = None

    def arm_after(self, run, now: int) -> None:
        """The answer `run` just ended: count from when its audio will have played."""
        played_s = time.perf_counter() - run.first_audio_at if run.first_audio_at is not None else 0.0
        unplayed_s = max(0.0, run.audio_ms / 1000 - played_s)
        self.since = now + int(unplayed_s * RATE)

    def due(self, now: int, timeout_ms: Optional[int]) -> Optional[int]:
        """The quiet's start if it has lasted `timeout_ms` (then disarmed), else None."""
        if timeout_ms is None or self.since is None or now - self.since < timeout_ms * RATE // 1000:
            return None
        since, self.since = self.since, None
        return since
