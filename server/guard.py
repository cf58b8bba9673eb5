"""What keeps one session's client from ending or holding it by misbehaving.

Two guards live here, both per session:

* `internal_error`: the last catch at the dispatch boundary. Validation where values enter
  (protocol.py, session_config.py, streaming.audio) turns every bad input we know of into a
  precise `error` event; an exception that still escapes a handler is a bug or an input
  nobody foresaw. It fails that one event (`internal_error`, type `server_error`) and the
  session goes on. Each distinct failure (exception type and where it was raised) is logged
  with its traceback once per process; repeats only count in `omni2_errors_total`, so a
  client cannot flood the log by repeating the event.
* `SessionClock`: the receive loop's deadlines. Idle: no client event for `idle_timeout_s`
  and no answer being generated closes the session; a live answer only postpones that until
  it ends (answers are bounded by max_steps and the send-stall timeout). Stall: mid-speech
  (VAD) with no audio for `input_stall_timeout_s`, the speech is ended as if the user had gone
  quiet, so a client that stops sending halfway through a sentence cannot pin the session
  busy; the idle deadline then applies as usual.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Callable, Optional

from .protocol import SERVER_ERROR, ProtocolError
from .settings import ServerSettings

log = logging.getLogger("omni2.server")

_logged: set[tuple] = set()
_logged_lock = threading.Lock()
POLL_S = 1.0          # how often a busy session's deadlines are looked at again


def _signature(exc: BaseException) -> tuple:
    tb = traceback.extract_tb(exc.__traceback__)
    where = (tb[-1].filename, tb[-1].lineno) if tb else ("?", 0)
    return (type(exc).__name__,) + where


def internal_error(exc: BaseException, event, session_id: str) -> ProtocolError:
    """The error event for an exception that escaped an event handler (logged once per kind)."""
    sig = _signature(exc)
    with _logged_lock:
        first = sig not in _logged
        if first and len(_logged) < 1024:
            _logged.add(sig)
    if first:
        log.error("session %s: %s failed; the session goes on (logged once per kind of failure)",
                  session_id, event.type, exc_info=exc)
    else:
        log.debug("session %s: %s failed again: %s", session_id, event.type, sig)
    return ProtocolError("internal_error", f"The server failed to handle this {event.type} event "
                         f"({type(exc).__name__}); the session goes on.", event_id=event.event_id,
                         type=SERVER_ERROR)


class SessionClock:
    """When the receive loop must wake up, and what is due then ("idle", "stall" or None)."""

    def __init__(self, settings: ServerSettings, now: Callable[[], float] = time.monotonic):
        self.idle_s = settings.idle_timeout_s
        self.stall_s = settings.input_stall_timeout_s
        self._now = now
        self.last_event = now()

    def heard(self) -> None:
        """A client event arrived."""
        self.last_event = self._now()

    def _stall_at(self, session) -> Optional[float]:
        audio = session.input
        if audio is None or not audio.in_speech:
            return None
        return audio.pushed_at + self.stall_s

    def wait_s(self, session) -> float:
        """Seconds to wait for the next client message before looking again."""
        now = self._now()
        # While an answer is live the idle deadline waits for its end, which is not a message:
        # look again every POLL_S (not in a tight loop once the deadline has passed).
        due = [now + POLL_S] if session.responding else [self.last_event + self.idle_s]
        stall = self._stall_at(session)
        if stall is not None:
            due.append(stall)
        return max(min(due) - now, 0.01)

    def due(self, session) -> Optional[str]:
        now = self._now()
        stall = self._stall_at(session)
        if stall is not None and now >= stall:
            return "stall"
        if now >= self.last_event + self.idle_s and not session.responding:
            return "idle"
        return None
