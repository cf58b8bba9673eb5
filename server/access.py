"""Who may open a session or read the server's figures: API keys, Origin, admission.

Keys come as `Authorization: Bearer <key>` (SDKs, scripts) or, for browsers that cannot set
WebSocket headers, as the subprotocol `openai-insecure-api-key.<key>` the OpenAI API
accepts; an ephemeral client secret is accepted wherever a key is. The Origin check protects browsers from other sites driving the server with the
user's network position; clients that send no Origin (SDKs, curl) are not browsers and pass.
With keys and no allowlist, only the server's own pages (Origin host = Host header) pass.
/metrics and /health/ready's details are for operators: on a server with keys they need a
metrics key (`metrics_keys`), never an API key.
"""
from __future__ import annotations

import hmac
import threading
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from .settings import ServerSettings

KEY_SUBPROTOCOL = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
REALTIME_SUBPROTOCOL = "realtime"


@dataclass(frozen=True)
class Refusal:
    status: int          # HTTP status before the upgrade
    code: str            # error code in the body
    message: str


def presented_key(headers: Mapping[str, str], subprotocols: Iterable[str],
                  allow_subprotocol: bool) -> Optional[str]:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_subprotocol:
        for proto in subprotocols:
            if proto.startswith(KEY_SUBPROTOCOL) and len(proto) > len(KEY_SUBPROTOCOL):
                return proto[len(KEY_SUBPROTOCOL):]
    return None


def key_matches(key: Optional[str], keys: tuple[str, ...]) -> bool:
    if key is None:
        return False
    # Compare against every key in constant time, so timing tells nothing about near misses.
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(key.encode(), k.encode())
    return ok


_DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(origin: str, host: str) -> bool:
    """Whether a page at `origin` is served by this server, as the Host header names it."""
    try:
        page, server = urlsplit(origin), urlsplit("//" + host.strip())
        page_port, server_port = page.port, server.port
    except ValueError:
        return False
    if page.scheme not in _DEFAULT_PORTS or not page.hostname or not server.hostname:
        return False  # "null" (file://, sandboxed frames) and anything that is not a web page
    default = _DEFAULT_PORTS[page.scheme]
    return (page.hostname, page_port or default) == (server.hostname, server_port or default)


def origin_allowed(settings: ServerSettings, origin: str, host: str) -> bool:
    if "*" in settings.allowed_origins:
        return True
    if settings.allowed_origins:
        return origin in settings.allowed_origins
    return not settings.auth_enabled or same_origin(origin, host)


def check_access(settings: ServerSettings, headers: Mapping[str, str],
                 subprotocols: Iterable[str], secret_ok: bool = False) -> Optional[Refusal]:
    """None when the connection may proceed, else why not. `secret_ok`: the key presented is
    a live client secret (server/client_secrets.py), as good as an API key."""
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(settings, origin, headers.get("host", "")):
        return Refusal(403, "origin_not_allowed", f"Origin {origin[:200]!r} is not allowed (see "
                       "--allowed-origin).")
    if settings.auth_enabled:
        key = presented_key(headers, subprotocols, settings.allow_key_in_subprotocol)
        if key is None:
            return Refusal(401, "missing_api_key", "An API key is required: send "
                           "'Authorization: Bearer <key>'.")
        if not (secret_ok or key_matches(key, settings.api_keys)):
            return Refusal(401, "invalid_api_key", "Incorrect API key provided.")
    return None


def check_operator(settings: ServerSettings, headers: Mapping[str, str]) -> Optional[Refusal]:
    """None when the caller may read /metrics and /health/ready's details, else why not."""
    if settings.metrics_keys:
        if key_matches(presented_key(headers, (), allow_subprotocol=False), settings.metrics_keys):
            return None
        return Refusal(401, "invalid_metrics_key", "A metrics key is required: send "
                       "'Authorization: Bearer <metrics key>'.")
    if settings.auth_enabled:
        return Refusal(403, "metrics_key_required", "This server has API keys, so its metrics need "
                       "their own key: set OMNI2_METRICS_KEYS (or --metrics-key).")
    return None


def wants_beta_names(headers: Mapping[str, str], subprotocols: Iterable[str]) -> bool:
    """Beta clients announce themselves; they get beta event names (see events.BETA_NAMES)."""
    return (BETA_SUBPROTOCOL in subprotocols
            or "realtime=v1" in headers.get("openai-beta", "").replace(" ", ""))


class Admission:
    """Counts live sessions; refuses past `limit` so every admitted session gets a slot."""

    def __init__(self, limit: int, sized: Callable[[], Optional[int]] = lambda: None):
        """limit 0: what `sized()` says once the engine has loaded (server/capacity.py), or
        capacity.CPU_SESSIONS for an engine that does not say."""
        self._limit = limit
        self._sized = sized
        self.active = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        if self._limit:
            return self._limit
        from .capacity import CPU_SESSIONS

        return int(self._sized() or CPU_SESSIONS)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)

    # The app's interface (server.workers.RemoteAdmission has the same): a ticket or None.
    async def enter(self):
        return True if self.try_acquire() else None

    def leave(self, ticket) -> None:
        self.release()

    async def refresh(self) -> None:
        """Figures of now for /health/ready and /metrics: these counts are always current."""

    def workers(self) -> Optional[dict]:
        """Each gateway worker's load; None in one process (there are no workers)."""
        return None

    worker = 0   # this process's gateway worker number: 0, one process (RemoteAdmission: 1..N)
