"""Secrets kept out of the logs.

Keys travel in the Authorization header or a subprotocol, which uvicorn does not log. But a
client may put one in the URL (`/v1/realtime?api_key=...`, as some SDKs do for browsers), and
uvicorn writes the path with its query string to the access log (HTTP) and to
`uvicorn.error` ("WebSocket /v1/realtime?... [accepted]"). The filter below rewrites every
query parameter value except the harmless `model` to `***` in those records, before any
handler formats them. Our own log lines never carry a key (settings.public() counts them).
"""
from __future__ import annotations

import logging
import re

KEPT_PARAMS = frozenset({"model"})
_PARAM = re.compile(r"([?&])([^=&#\s\"]+)=([^&#\s\"]*)")
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_query(text: str) -> str:
    """`text` with the value of every URL query parameter (but `model`) replaced by ***."""
    if "?" not in text:
        return text
    return _PARAM.sub(lambda m: m.group(0) if m.group(2).lower() in KEPT_PARAMS
                      else f"{m.group(1)}{m.group(2)}=***", text)


class RedactQuery(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


def redact_uvicorn_logs() -> None:
    """Install the filter on uvicorn's loggers (once each; safe to call again)."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuery) for f in logger.filters):
            logger.addFilter(RedactQuery())
