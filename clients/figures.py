"""What a listener hears, in figures: percentiles, jitter-buffer underruns and one answer's
figures from its audio arrivals (shared by `omni2 chat`, `omni2 loadtest`, its live
microphones in clients/live_load.py and the benchmarks in clients/tools: every percentile
omni2 reports is this module's, and every answer's time to first audio, audio seconds and
wall time comes from `answer_figures`, through an `AnswerTracker` where the events arrive)."""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Iterable, Optional

from omni2.streaming.audio import REALTIME_SAMPLE_RATE

JITTER_S = 0.2    # a client's playback buffer (browsers and phones hold 100-300 ms)


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


@dataclass
class AnswerFigures:
    status: str
    ttfa_s: Optional[float]        # first audio after the question ended (None: unknown or never)
    audio_s: float
    gaps: int                      # playback underruns behind the jitter buffer
    stopped_by_user: bool = False
    rate: Optional[float] = None   # audio seconds per wall second between its first and last delta
    wall_s: Optional[float] = None  # question's end to response.done


def arrival_rate(arrivals: list) -> Optional[float]:
    """How fast an answer's audio came: seconds of audio (all deltas but the first, 24 kHz
    samples) per second between the first delta and the last; below 1, its listener falls
    behind (the server's pacer keeps it near 1 when the audio is made faster)."""
    if len(arrivals) < 2 or arrivals[-1][0] <= arrivals[0][0]:
        return None
    return sum(n for _, n in arrivals[1:]) / REALTIME_SAMPLE_RATE / (arrivals[-1][0] - arrivals[0][0])


def answer_figures(status: str, arrivals: list[tuple[float, int]], asked_at: Optional[float], jitter_s: float,
                   done_at: Optional[float] = None, stopped_by_user: bool = False) -> AnswerFigures:
    """One answer's figures from its audio `arrivals` ((arrival time, 24 kHz samples) per delta)
    and when its question ended. A question end after the first audio (the end the client
    guessed, before the server's speech_stopped said) gives no time to first audio rather than
    a negative one."""
    first = arrivals[0][0] if arrivals else None
    ttfa = None if first is None or asked_at is None or asked_at > first else first - asked_at
    wall = None if done_at is None or asked_at is None else done_at - asked_at
    return AnswerFigures(status, ttfa, sum(n for _, n in arrivals) / REALTIME_SAMPLE_RATE,
                         count_underruns(arrivals, jitter_s), stopped_by_user, arrival_rate(arrivals), wall)


class AnswerTracker:
    """A session's answers, followed through its server events: `feed(event, now)` each one;
    at response.done it returns that answer's figures. The question ends at the server's
    speech_stopped (or when the owner sets `asked_at`: the client that commits its question);
    response.created opens an answer; its audio deltas arrive, their PCM16 appended to `audio`
    if one is given (decoded once, for the one who keeps it)."""

    def __init__(self, jitter_s: float, audio: Optional[bytearray] = None):
        self.jitter_s = jitter_s
        self.audio = audio
        self.asked_at: Optional[float] = None
        self.arrivals: list[tuple[float, int]] = []
        self.stopped_by_user = False      # the user talked over this answer (set by the driver)
        self.heard_until: Optional[float] = None   # when a listener has heard the last answer out

    @property
    def playing(self) -> bool:
        """An answer's audio has begun and it has not ended."""
        return bool(self.arrivals)

    def new_question(self) -> None:
        """A question is about to be asked: an earlier speech_stopped is not its end."""
        self.asked_at = None

    def figures(self, status: str, done_at: Optional[float] = None) -> AnswerFigures:
        """The current answer's figures so far."""
        return answer_figures(status, self.arrivals, self.asked_at, self.jitter_s, done_at, self.stopped_by_user)

    def feed(self, event: dict, now: float) -> Optional[AnswerFigures]:
        kind = event["type"]
        if kind == "input_audio_buffer.speech_stopped":
            self.asked_at = now
        elif kind == "response.created":
            self.arrivals, self.stopped_by_user = [], False
        elif kind == "response.output_audio.delta":
            pcm = base64.b64decode(event["delta"])
            self.arrivals.append((now, len(pcm) // 2))
            if self.audio is not None:
                self.audio += pcm
        elif kind == "response.done":
            done = self.figures(event.get("response", {}).get("status", "unknown"), now)
            self.heard_until = (self.arrivals[0][0] if self.arrivals else now) + self.jitter_s + done.audio_s
            self.asked_at, self.arrivals, self.stopped_by_user = None, [], False
            return done
        return None
