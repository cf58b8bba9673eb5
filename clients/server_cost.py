"""What a server on this host spends under a load: its whole process tree's CPU (engine and
gateways, from /proc), and each gateway's event-loop lag (from /health/ready, or /metrics on an
older server). `omni2 loadtest --live` (clients/live_load.py) and `omni2 bench gateway`
(clients/tools/gateway_bench.py) charge it per session with `cpu_window`.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Optional


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every descendant alive now, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def server_pid_for_port(port: int) -> Optional[int]:
    """The process listening on 127.0.0.1/0.0.0.0 TCP `port` (its socket's owner, from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(cols[9])
        except OSError:
            continue
    if not inodes:
        return None
    owners = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                link = os.readlink(f"/proc/{name}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    owners.append(int(name))
                    break
        except OSError:
            continue
    if not owners:
        return None
    # An older multi-process server's gateways shared the listening socket: the oldest owner
    # is the parent (today only the supervisor holds it).
    return min(owners, key=lambda pid: _start_time(pid))


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return 1 << 62


def _scrape_lag(port: int) -> tuple[int, dict[float, int], dict[int, int]]:
    """(worker that answered (0: one process), its lag buckets, {worker: sessions} as /metrics
    lists them)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0, {}, {}
    out, worker, listed = {}, 0, {}
    for line in text.splitlines():
        if line.startswith("omni2_event_loop_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("omni2_worker "):
            worker = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("omni2_worker_sessions{"):
            listed[int(line.split('worker="', 1)[1].split('"', 1)[0])] = int(float(line.rsplit(" ", 1)[1]))
    return worker, out, listed


def worker_lag_buckets(port: int, tries: int = 24) -> tuple[dict[int, dict[float, int]], dict[int, int]]:
    """Each gateway worker's lag buckets {worker: buckets} ({0: ...} for one process), and the
    sessions each worker holds ({} for one process).

    Each worker counts its own loop's lag. A multi-worker server lists every gateway's
    histogram (as of its last heartbeat, every 0.25 s) in /health/ready, since a scrape of
    /metrics reaches only the gateway the supervisor places that connection on (two scrapes
    compared as one histogram mixed two processes' counts: p99 of 75-100 ms that no gateway
    had). An older server without that: new /metrics connections until every worker it lists
    has answered (at most `tries`)."""
    listed_lags = _ready_lags(port)
    if listed_lags is not None:
        return listed_lags
    seen: dict[int, dict[float, int]] = {}
    listed: dict[int, int] = {}
    for _ in range(tries):
        worker, buckets, sessions = _scrape_lag(port)
        listed = sessions or listed
        if buckets:
            seen.setdefault(worker, buckets)
        if seen and (worker == 0 or set(listed) <= set(seen)):
            break
    return seen, listed


def _ready_lags(port: int) -> Optional[tuple[dict[int, dict[float, int]], dict[int, int]]]:
    """({worker: lag buckets}, {worker: sessions}) from /health/ready's workers, or None where
    it lists none (one process) or without their lag."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as r:
            workers = json.loads(r.read()).get("workers")
    except (OSError, ValueError):
        return None
    if not workers or not all("loop_lag" in w for w in workers.values()):
        return None
    lags = {int(k): {float(le): int(n) for le, n in w["loop_lag"].items()} for k, w in workers.items()}
    return lags, {int(k): int(w.get("sessions", 0)) for k, w in workers.items()}


def lag_p99_ms(before: dict[float, int], after: dict[float, int]) -> Optional[float]:
    """Upper bound of the bucket holding the 99th percentile of the samples between two scrapes."""
    if not after:
        return None
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return None
    for b, c in zip(bounds, counts):
        if c >= 0.99 * total:
            return 1000.0 * b
    return None


def cpu_window(pid: int, port: int, wait_s: float, span_s: float) -> dict:
    """Sleep `wait_s`, then the server tree's CPU (cores) and loop lag over the next `span_s`:
    `lag_p99_ms` is the worst worker's p99, `lag_p99_ms_by_worker` each worker's, and
    `sessions_by_worker` what each gateway held at the end (the supervisor's placement:
    fill one gateway up to its share, then the next)."""
    time.sleep(wait_s)
    (lag0, _), cpu0, t0 = worker_lag_buckets(port), process_tree_cpu(pid), time.monotonic()
    time.sleep(span_s)
    cpu1, t1, (lag1, sessions) = process_tree_cpu(pid), time.monotonic(), worker_lag_buckets(port)
    by_worker = {w: lag_p99_ms(lag0[w], lag1[w]) for w in sorted(lag1) if w in lag0}
    known = [v for v in by_worker.values() if v is not None]
    return {"cores": (cpu1 - cpu0) / (t1 - t0), "lag_p99_ms": max(known) if known else None,
            "lag_p99_ms_by_worker": by_worker, "sessions_by_worker": dict(sorted(sessions.items()))}
