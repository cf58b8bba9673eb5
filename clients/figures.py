"""What a listener hears, in figures: percentiles and jitter-buffer underruns (shared by
`omni2 loadtest`, its live microphones in clients/live_load.py and the benchmarks in
clients/tools: every percentile omni2 reports is this module's)."""
from __future__ import annotations

import math
from typing import Iterable, Optional

from omni2.streaming.audio import REALTIME_SAMPLE_RATE


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """The q-th percentile (q in 0..100) by nearest rank, None for no values.

    Nearest rank: the smallest value with at least q% of all values at or below it, the
    ceil(q/100 * n)-th smallest (numpy's method="inverted_cdf"), not numpy's default linear
    interpolation between neighbours. Deliberately: a reported latency is one that was really
    seen, and over n values any q >= 100 (1 - 1/n) gives the slowest one, which
    clients/tools/bench_arrivals.py's hold rule relies on (its p99 of a few dozen turns).
    """
    ordered = sorted(values)
    if not ordered:
        return None
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
