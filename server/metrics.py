"""Prometheus metrics in the text exposition format, written by hand.

The server needs a dozen counters, gauges and histograms; the text format is simple and
stable, so a dependency would buy nothing. Engine figures (slots, queue, step times) are
read from `engine.stats()` at scrape time; the engine reports step times as a recent window
plus a running total, and only the samples new since the last scrape enter the histogram.
"""
from __future__ import annotations

import math
import threading
from typing import Iterable, Optional

# Time buckets (seconds): step times sit in the milliseconds, first audio in the 100s of ms.
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
TTFA_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
# The vocoder's figures since start (streaming/engine/vocoder.py); audio_seconds / busy_seconds
# is how many answers it could keep in real time.
VOCODER_FIGURES = {
    "calls": "SNAC calls of the vocoder since start",
    "windows": "Answer windows decoded (several per batched call) since start",
    "audio_seconds": "Seconds of speech the vocoder made since start",
    "busy_seconds": "Wall seconds the vocoder spent in SNAC calls since start",
    "cpu_seconds": "CPU seconds of the vocoder thread in SNAC calls since start",
}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help_: str, label: Optional[str] = None):
        self.name, self.help, self.label = name, help_, label
        self._values: dict[str, float] = {} if label else {"": 0.0}
        self._lock = threading.Lock()

    def inc(self, value: float = 1.0, label: str = "") -> None:
        with self._lock:
            self._values[label] = self._values.get(label, 0.0) + value

    def get(self, label: str = "") -> float:
        return self._values.get(label, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for label, v in sorted(self._values.items()):
            yield f"{self.name}{_labels({self.label: label} if self.label else {})} {_num(v)}"


class Gauge:
    def __init__(self, name: str, help_: str):
        self.name, self.help, self.value = name, help_, 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_num(self.value)}"


class GaugeSet:
    """Gauges by one label (e.g. per worker process); the set is replaced at each scrape."""

    def __init__(self, name: str, help_: str, label: str):
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = {}

    def replace(self, values: dict[str, float]) -> None:
        self.values = {str(k): float(v) for k, v in values.items()}

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for label, v in sorted(self.values.items()):
            yield f"{self.name}{_labels({self.label: label})} {_num(v)}"


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self.count, self.sum = 0, 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            i = 0
            while i < len(self.buckets) and value > self.buckets[i]:
                i += 1
            self._counts[i] += 1
            self.count += 1
            self.sum += value

    def cumulative(self) -> dict[str, int]:
        """{upper bound as /metrics spells it ("+Inf" last): samples at or below it}."""
        with self._lock:
            counts = list(self._counts)
        out, running = {}, 0
        for bound, n in zip(self.buckets + (math.inf,), counts):
            running += n
            out[_num(bound)] = running
        return out

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for le, running in self.cumulative().items():
            yield f'{self.name}_bucket{{le="{le}"}} {running}'
        yield f"{self.name}_sum {_num(self.sum)}"
        yield f"{self.name}_count {self.count}"


class Metrics:
    """All server metrics; one instance per app."""

    def __init__(self) -> None:
        p = "omni2_"
        self.sessions_active = Gauge(p + "sessions_active", "WebSocket sessions open now")
        self.max_sessions = Gauge(p + "max_sessions", "Sessions admitted at most (all workers)")
        self.worker_sessions = GaugeSet(p + "worker_sessions", "Sessions open per gateway worker "
                                        "(omni2 serve --workers)", "worker")
        self.worker_connections = GaugeSet(p + "worker_connections", "TCP connections open per gateway "
                                           "worker", "worker")
        self.sessions_total = Counter(p + "sessions_total", "Sessions accepted since start")
        self.refused_total = Counter(p + "sessions_refused_total", "Connections refused", "reason")
        self.connections_open = Gauge(p + "connections_open", "TCP connections open now (HTTP and WebSocket)")
        self.connections_refused = Counter(p + "connections_refused_total", "TCP connections refused or "
                                           "closed before a request (server/limits.py)", "reason")
        self.responses_total = Counter(p + "responses_total", "Responses finished", "status")
        self.cancels_total = Counter(p + "response_cancels_total", "Responses cancelled", "reason")
        self.interrupts_total = Counter(p + "interrupts_total", "Duplex interrupts heard (command, "
                                        "barge_in)", "kind")
        self.errors_total = Counter(p + "errors_total", "Error events sent to clients", "code")
        self.events_in_total = Counter(p + "client_events_total", "Client events received", "type")
        self.audio_out_seconds = Counter(p + "audio_out_seconds_total", "Seconds of speech sent")
        self.speculations_total = Counter(p + "speculative_turns_total", "Questions encoded and "
                                          "prefilled during the closing silence", "outcome")
        self.truncations_total = Counter(p + "context_truncations_total",
                                         "Oldest turns dropped from a session's model context")
        self.frames_dropped = Counter(p + "image_frames_dropped_total",
                                      "Camera frames dropped by the 1 fps limit")
        self.ttfa = Histogram(p + "time_to_first_audio_seconds",
                              "End of user speech (or response.create) to first audio delta sent",
                              TTFA_BUCKETS)
        self.rtf = Histogram(p + "response_real_time_factor",
                             "Response wall time / seconds of speech produced (<1: faster than "
                             "real time)", RTF_BUCKETS)
        self.step_seconds = Histogram(p + "engine_step_seconds", "Engine decode step time", STEP_BUCKETS)
        self.free_slots = Gauge(p + "engine_free_slots", "Engine slots free")
        self.live_turns = Gauge(p + "engine_live_turns", "Turns decoding now")
        self.queue_depth = Gauge(p + "engine_queue_depth", "Turns waiting for a slot")
        self.engine_cancels = Gauge(p + "engine_cancels", "Cancels seen by the engine since start")
        self.engine_errors = Gauge(p + "engine_errors", "Turn errors in the engine since start")
        self.engine_refused_busy = Gauge(p + "engine_refused_busy", "Turns refused for lack of step-time "
                                         "headroom since start")
        self.vocoder = {k: Gauge(p + f"vocoder_{k}", text) for k, text in VOCODER_FIGURES.items()}
        from .loop_lag import LAG_BUCKETS

        self.loop_lag = Histogram(p + "event_loop_lag_seconds", "How late the event loop woke a "
                                  "timer (server/loop_lag.py)", LAG_BUCKETS)
        self.worker = Gauge(p + "worker", "Gateway worker number of the process that answered this "
                            "scrape (0: one process); the figures above and below that are not global are "
                            "its own")
        self.ready = Gauge(p + "ready", "1 when the model is loaded and warmed up")
        self.resident_bytes = Gauge(p + "process_resident_bytes", "Resident memory of the server process")
        self.heap_in_use = Gauge(p + "heap_in_use_bytes", "C heap in use (glibc mallinfo2, all arenas)")
        self.heap_free = Gauge(p + "heap_free_bytes", "C heap free but held (returned by the periodic trim)")
        self._steps_seen = 0

    def absorb_engine(self, stats: dict) -> None:
        """Copy engine figures; feed only step samples not seen at the previous scrape."""
        self.free_slots.set(stats.get("free_slots", 0))
        self.live_turns.set(stats.get("live_turns", 0))
        self.queue_depth.set(stats.get("queued_turns", 0))
        self.engine_cancels.set(stats.get("cancels_total", 0))
        self.engine_errors.set(stats.get("errors_total", 0))
        self.engine_refused_busy.set(stats.get("refused_busy_total", 0))
        for k, gauge in self.vocoder.items():
            gauge.set(stats.get(f"vocoder_{k}_total", 0))
        total = int(stats.get("steps_total", 0))
        recent = list(stats.get("step_seconds", ()))
        new = max(0, min(total - self._steps_seen, len(recent)))
        for v in recent[len(recent) - new:]:
            self.step_seconds.observe(float(v))
        self._steps_seen = max(self._steps_seen, total)

    def absorb_workers(self, workers: dict) -> None:
        """Per-worker load as the engine process last heard it from each gateway."""
        self.worker_sessions.replace({w: d.get("sessions", 0) for w, d in workers.items()})
        self.worker_connections.replace({w: d.get("connections", 0) for w, d in workers.items()})

    def absorb_memory(self, resident: Optional[int], heap: Optional[dict]) -> None:
        if resident is not None:
            self.resident_bytes.set(resident)
        if heap is not None:
            self.heap_in_use.set(heap["in_use"])
            self.heap_free.set(heap["free"])

    def render(self, engine_stats: Optional[dict] = None) -> str:
        if engine_stats is not None:
            self.absorb_engine(engine_stats)
        lines: list[str] = []
        for m in vars(self).values():  # every metric defined above, in that order
            for one in (m.values() if isinstance(m, dict) else (m,)):
                if isinstance(one, (Counter, Gauge, GaugeSet, Histogram)):
                    lines.extend(one.render())
        return "\n".join(lines) + "\n"
