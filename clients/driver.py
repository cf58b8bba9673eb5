"""Driving realtime sessions under load, once for every load tool: `omni2 loadtest`
(clients/loadtest.py, turn by turn), its live microphones (clients/live_load.py) and
`omni2 bench soak` (clients/tools/soak.py).

- `SessionTally` counts how sessions went: connected; refused (close 1013 or a busy error:
  the server's admission at work, not a fault); capped (HTTP 503 at the handshake: the
  server's connection cap, which a loopback load from one address meets at 32 sessions by
  default); and errors, one line each, for anything else. `open_session` connects and counts;
  `tally.holding(index, client)` closes the client and counts what broke the session.
- `answer_figures` turns one answer's audio arrivals into what its listener got: time to first
  audio, audio seconds, playback gaps behind a jitter buffer, the audio's arrival rate.
- `AnswerTracker` follows a session's answers through the server's events (for sessions whose
  turns the server's VAD starts) and hands back each answer's figures when it ends.
- The send schedule, `Pacer`, is the client's (clients/realtime_client.py): `send_audio` paces
  a question by it, and live_load.py a microphone's chunk every 100 ms, taking how late each
  send was done as the load generator's own lag.
"""
from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass, field
from typing import Optional

from omni2.streaming.audio import REALTIME_SAMPLE_RATE

from .figures import count_underruns
from .realtime_client import RealtimeClient, RealtimeError

CAPPED = "http_503"   # what RealtimeClient.connect names the cap's bare 503 (server/limits.py)
CAP_NOTE = ("note: the server refused connections at its per-client cap: run it with "
            "--max-connections-per-client 0 (or OMNI2_MAX_CONNECTIONS_PER_CLIENT=0) for a loopback load")


@dataclass
class SessionTally:
    connected: int = 0
    refused: int = 0              # turned away as busy (1013): at the handshake or for an answer
    capped: int = 0               # refused by the connection cap (HTTP 503 at the handshake)
    errors: list[str] = field(default_factory=list)

    def failed(self, index: int, exc: BaseException) -> None:
        """One error line for session `index` (a RealtimeError says its code; others their type)."""
        what = str(exc) if isinstance(exc, RealtimeError) else f"{type(exc).__name__}: {exc}"
        self.errors.append(f"session {index}: {what}")

    def add(self, other: "SessionTally") -> None:
        self.connected += other.connected
        self.refused += other.refused
        self.capped += other.capped
        self.errors += other.errors

    @contextlib.asynccontextmanager
    async def holding(self, index: int, client: RealtimeClient):
        """The body drives `client`; whatever breaks it (a closed socket, a protocol error, a
        timeout) is counted as this session's error and ends only this session; the client is
        closed on the way out."""
        try:
            yield client
        except Exception as exc:   # websockets' ConnectionClosed too: one session's end, not the run's
            self.failed(index, exc)
        finally:
            await client.close()


async def open_session(url: str, api_key: Optional[str], tally: SessionTally, index: int) -> Optional[RealtimeClient]:
    """A connected client (session.created received), or None with the reason counted."""
    try:
        client = await RealtimeClient.connect(url, api_key=api_key)
    except RealtimeError as exc:
        if exc.refused:
            tally.refused += 1
        elif exc.code == CAPPED:
            tally.capped += 1
        else:
            tally.failed(index, exc)
        return None
    tally.connected += 1
    return client


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
    speech_stopped; response.created opens an answer; its audio deltas arrive."""

    def __init__(self, jitter_s: float):
        self.jitter_s = jitter_s
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
            self.arrivals.append((now, len(base64.b64decode(event["delta"])) // 2))
        elif kind == "response.done":
            done = self.figures(event.get("response", {}).get("status", "unknown"), now)
            self.heard_until = (self.arrivals[0][0] if self.arrivals else now) + self.jitter_s + done.audio_s
            self.asked_at, self.arrivals, self.stopped_by_user = None, [], False
            return done
        return None
