"""Ephemeral client secrets: POST /v1/realtime/client_secrets, as OpenAI issues them.

A browser or phone app should never hold a long-lived API key. Its backend (or the web
page, trading the key once) asks for a client secret: `{"expires_after": {"anchor":
"created_at", "seconds": 10..7200}, "session": {...}}` answered by `{"value": "ek_...",
"expires_at": <unix s>, "session": {...}}`. Until it expires the value opens realtime
sessions wherever an API key is accepted (Bearer header, or the `openai-insecure-api-key.`
subprotocol browsers use), as many as wanted, each starting with the secret's session
configuration. Secrets live in this process's memory: a restart forgets them.
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Callable, Optional

from .protocol import ProtocolError, field_of

PREFIX = "ek_"
MIN_S, MAX_S, DEFAULT_S = 10, 7200, 600   # the API's range and default for expires_after.seconds


class ClientSecrets:
    def __init__(self, limit: int = 10000, clock: Callable[[], float] = time.time):
        self.limit = limit
        self.clock = clock
        self._live: dict[str, tuple[float, dict]] = {}   # value -> (expires_at, session patch)
        self._lock = threading.Lock()

    def mint(self, expires_after: Optional[dict], session: dict) -> tuple[str, int]:
        """A new secret for `session` (a session.update payload, already validated)."""
        seconds = expiry_seconds(expires_after)
        value = PREFIX + secrets.token_urlsafe(24)
        expires_at = int(self.clock()) + seconds
        with self._lock:
            self._purge()
            if len(self._live) >= self.limit:
                raise ProtocolError("rate_limit_exceeded", f"{self.limit} client secrets are live; "
                                    "try again when some have expired.", type="server_error")
            self._live[value] = (expires_at, session)
        return value, expires_at

    def session_of(self, value: Optional[str]) -> Optional[dict]:
        """The session patch of a live secret, or None (unknown, expired, or not a secret)."""
        if not value or not value.startswith(PREFIX):
            return None
        with self._lock:
            entry = self._live.get(value)
            if entry is None or entry[0] <= self.clock():
                self._live.pop(value, None)
                return None
            return entry[1]

    def _purge(self) -> None:
        now = self.clock()
        for value in [v for v, (at, _) in self._live.items() if at <= now]:
            del self._live[value]


def expiry_seconds(expires_after: Optional[dict]) -> int:
    if expires_after is None:
        return DEFAULT_S
    if not isinstance(expires_after, dict):
        raise ProtocolError("invalid_type", "'expires_after' must be an object.", "expires_after")
    anchor = field_of(expires_after, "anchor", str, "expires_after.anchor", default="created_at")
    if anchor != "created_at":
        raise ProtocolError("invalid_value", "expires_after.anchor must be 'created_at'.", "expires_after.anchor")
    seconds = field_of(expires_after, "seconds", int, "expires_after.seconds", default=DEFAULT_S)
    if not MIN_S <= seconds <= MAX_S:
        raise ProtocolError("invalid_value", f"expires_after.seconds must be {MIN_S}..{MAX_S}.",
                            "expires_after.seconds")
    return seconds
