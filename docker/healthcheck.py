"""Container health check: exit 0 when /health/ready says the model is loaded, else 1.

Standard library only (it runs in the image's interpreter without importing the app).
The port and host come from OMNI2_PORT / OMNI2_HEALTH_HOST, the same variables the server
reads, so a changed port needs no second edit.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def ready_url(env=os.environ) -> str:
    host = env.get("OMNI2_HEALTH_HOST", "127.0.0.1")
    port = env.get("OMNI2_PORT", "8000")
    return f"http://{host}:{port}/health/ready"


def check(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
            return response.status == 200 and body.get("status") == "ready", json.dumps(body)
    except urllib.error.HTTPError as exc:       # 503 while loading, with the state in the body
        return False, f"HTTP {exc.code}: {exc.read(500).decode(errors='replace')}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def main() -> int:
    ok, detail = check(ready_url())
    print(("ready " if ok else "not ready ") + detail)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
