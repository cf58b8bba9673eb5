"""Driving realtime sessions under load, once for every load tool: `omni2 loadtest`
(clients/loadtest.py, turn by turn), its live microphones (clients/live_load.py) and
`omni2 bench soak` (clients/tools/soak.py).

- `SessionTally` counts how sessions went: connected; refused (close 1013 or a busy error:
  the server's admission at work, not a fault); capped (HTTP 503 at the handshake: the
  server's connection cap, which a loopback load from one address meets at 32 sessions by
  default); and errors, one line each, for anything else. `open_session` connects and counts;
  `tally.holding(index, client)` closes the client and counts what broke the session.
- What each answer's listener got (time to first audio, audio seconds, playback gaps) is
  measured where the events arrive: `AnswerTracker` (clients/figures.py), fed by the client's
  `ask()` for a turn and by live_load.py for a live microphone's session.
- The send schedule, `Pacer`, is the client's (clients/realtime_client.py): `send_audio` paces
  a question by it, and live_load.py a microphone's chunk every 100 ms, taking how late each
  send was done as the load generator's own lag.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

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
