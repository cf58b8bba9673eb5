"""The engine as the server sees it: loading in the background, readiness, and facts.

The HTTP side comes up at once (so /health answers and orchestrators see a live process)
while the model loads and warms up on a thread; /health/ready and new sessions wait for
`ready`. A load failure is kept and reported, not raised into the event loop.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from omni2.model.errors import CheckpointError

log = logging.getLogger("omni2.server")

# loader() -> (engine, info); info has model, device, dtype, fallback (bool)
Loader = Callable[[], tuple[object, dict]]


class EngineHost:
    def __init__(self) -> None:
        self.engine = None
        self.info: dict = {}
        self.error: Optional[str] = None
        self.state = "loading"            # loading | ready | failed
        self.load_seconds: Optional[float] = None
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def ready_with(cls, engine, info: dict) -> "EngineHost":
        host = cls()
        host.engine, host.info, host.state = engine, dict(info), "ready"
        return host

    @classmethod
    def loading(cls, loader: Loader) -> "EngineHost":
        host = cls()
        host._thread = threading.Thread(target=host._load, args=(loader,), name="omni2-load", daemon=True)
        host._thread.start()
        return host

    def _load(self, loader: Loader) -> None:
        t0 = time.perf_counter()
        try:
            engine, info = loader()
        except Exception as exc:  # reported by /health/ready; the process stays up to say so
            # A checkpoint that is missing or damaged is a message for the operator, not a bug.
            log.error("model failed to load: %s", exc,
                      exc_info=not isinstance(exc, (OSError, ValueError, CheckpointError)))
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            return
        self.engine, self.info = engine, dict(info)
        self.load_seconds = time.perf_counter() - t0
        self.state = "ready"
        log.info("model ready in %.1f s: %s", self.load_seconds, self.info)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    @property
    def model_name(self) -> str:
        return str(self.info.get("model", "omni2"))

    def stats(self) -> Optional[dict]:
        if not self.ready:
            return None
        try:
            return self.engine.stats()
        except Exception:  # metrics must never take the endpoint down
            log.exception("engine.stats() failed")
            return None

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (any thread) if the engine is lost; returns the way to unregister.
        An in-process engine is never lost apart from the process (server.workers' is)."""
        return lambda: None

    def stop(self) -> None:
        if self.engine is not None:
            try:
                self.engine.stop()
            except Exception:
                log.exception("engine.stop() failed")
