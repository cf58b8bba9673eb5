"""Ephemeral client secrets: POST /v1/realtime/client_secrets, as OpenAI issues them.

A browser or phone app should never hold a long-lived API key. Its backend (or the web
page, trading the key once) asks for a client secret: `{"expires_after": {"anchor":
"created_at", "seconds": 10..7200}, "session": {...}}` answered by `{"value": "ek_...",
"expires_at": <unix s>, "session": {...}}`. Until it expires the value opens realtime
sessions wherever an API key is accepted (Bearer header, or the `openai-insecure-api-key.`
subprotocol browsers use), as many as wanted, each starting with the secret's session
configuration.

A secret carries its expiry and session and is signed (HMAC-SHA256) with the server's key,
`client_secret_key`: any process holding that key checks it without having seen it minted,
so a secret minted by one gateway of `--workers N` opens sessions on all of them (the
supervisor gives them one key), and servers given the same key share secrets. With no key
set each server draws one at start: a restart invalidates the secrets it issued.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import zlib
from typing import Callable, Optional

from .protocol import ProtocolError, field_of

PREFIX = "ek_"
MIN_S, MAX_S, DEFAULT_S = 10, 7200, 600   # the API's range and default for expires_after.seconds
MAX_VALUE_CHARS = 8192   # the value travels in a header (or a subprotocol): sessions past this are refused


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key() -> str:
    return secrets.token_hex(32)


class ClientSecrets:
    def __init__(self, key: str = "", clock: Callable[[], float] = time.time):
        self._key = (key or new_key()).encode()
        self.clock = clock

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def mint(self, expires_after: Optional[dict], session: dict) -> tuple[str, int]:
        """A new secret for `session` (a session.update payload, already validated)."""
        seconds = expiry_seconds(expires_after)
        expires_at = int(self.clock()) + seconds
        claims = json.dumps({"exp": expires_at, "session": session}, separators=(",", ":"))
        body = _b64(zlib.compress(claims.encode()))
        value = f"{PREFIX}{body}.{self._sign(body)}"
        if len(value) > MAX_VALUE_CHARS:
            raise ProtocolError("invalid_value", f"The session is too large for a client secret "
                                f"({len(value)} characters; at most {MAX_VALUE_CHARS}).", "session")
        return value, expires_at

    def session_of(self, value: Optional[str]) -> Optional[dict]:
        """The session patch of a live secret, or None (forged, expired, or not a secret)."""
        if not value or not value.startswith(PREFIX) or value.count(".") != 1 or len(value) > MAX_VALUE_CHARS:
            return None
        body, sig = value[len(PREFIX):].split(".")
        if not hmac.compare_digest(sig, self._sign(body)):
            return None
        try:
            claims = json.loads(zlib.decompress(_unb64(body)))
        except (ValueError, binascii.Error, zlib.error):
            return None
        if claims["exp"] <= self.clock():
            return None
        return claims["session"]


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
