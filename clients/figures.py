"""What a listener hears, in figures: nearest-rank percentiles and jitter-buffer underruns
(shared by `omni2 loadtest` and its live microphones, clients/live_load.py)."""
from __future__ import annotations

import math
from typing import Optional

from omni2.streaming.audio import REALTIME_SAMPLE_RATE


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (no interpolation: a reported latency was really seen)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def count_underruns(arrivals: list[tuple[float, int]], jitter_s: float, rate: int = REALTIME_SAMPLE_RATE) -> int:
    """Stalls a listener hears: playback starts once `jitter_s` of audio has arrived and then
    plays in real time; when it needs audio that has not arrived while more is still coming,
    that is one underrun, and it waits for the buffer to fill to `jitter_s` again.
    `arrivals` are (arrival time, samples) of each audio delta, in order."""
    underruns = 0
    dry_at: Optional[float] = None        # while playing: when the buffered audio runs out
    buffered = 0                          # while waiting: samples received since the stall
    for at, samples in arrivals:
        if dry_at is not None and at > dry_at:
            underruns += 1
            dry_at, buffered = None, 0
        if dry_at is not None:
            dry_at += samples / rate
            continue
        buffered += samples
        if buffered >= jitter_s * rate:
            dry_at = at + buffered / rate
    return underruns
