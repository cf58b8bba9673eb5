"""`omni2 bench soak`: does the server's memory stay flat under a steady load?

Starts `omni2 serve` as a child process (its memory is then its own), waits for it to be
ready, and keeps `--sessions` realtime clients talking to it for `--minutes`: each streams
spoken questions (espeak-ng, at real time, server VAD) and listens to the answers, and after
`--turns-per-session` turns hangs up and connects afresh, so sessions open and close all
along. The child's resident memory (VmRSS of /proc/PID/status) is sampled every
`--sample-s`. Reported: RSS when ready, at the end of the warm-up (`--warmup-min`), at the
end, its range after the warm-up and the growth after it (end vs. warm-up end, and a
least-squares slope in MB per minute), the high-water mark (VmHWM), RSS once the clients have
gone, turns answered, and the steady memory per session ((mean RSS after warm-up - RSS when
ready) / sessions). The target of issue 19: growth within +-10% after the warm-up.

Extra `omni2 serve` flags go after `--`, e.g. `omni2 bench soak --minutes 10 -- --no-speculation`.
"""
from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from omni2.clients.driver import SessionTally, open_session
from omni2.streaming.audio import REALTIME_SAMPLE_RATE

QUESTIONS = ["what can you see in front of you", "tell me about the weather today",
             "how far is it to the station", "what colour is the car over there",
             "can you read the sign for me", "is it going to rain this afternoon"]
READY_TIMEOUT_S = 300.0
MB = 1 << 20


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon (the heap, stacks, anonymous maps: what can leak) and RssFile
    (mapped libraries and files: fixed once the code paths have run) of a process, in bytes,
    from /proc (Linux). `omni2 serve` is one process (no workers), so this is all of it."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    values = memory_of(pid)
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class Sample:
    t: float              # seconds since the clients started
    rss: int
    turns: int            # turns answered so far
    heap_in_use: Optional[int] = None   # the server's own C-heap figures (/metrics), when it has them
    heap_free: Optional[int] = None
    anon: Optional[int] = None          # RssAnon (RSS less the mapped files)


def heap_figures(port: int) -> tuple[Optional[int], Optional[int]]:
    """omni2_heap_in_use_bytes and omni2_heap_free_bytes from the server's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None, None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("omni2_heap_in_use_bytes", "omni2_heap_free_bytes"):
            values[name] = int(float(value))
    return values.get("omni2_heap_in_use_bytes"), values.get("omni2_heap_free_bytes")


@dataclass
class SoakRun(SessionTally):     # sessions connected / refused / capped / errors (clients/driver.py)
    samples: list[Sample] = field(default_factory=list)
    turns: int = 0
    failed: int = 0


def questions(rate: int = REALTIME_SAMPLE_RATE) -> list[np.ndarray]:
    """Spoken questions with 0.4 s of quiet before and 1.2 s after (the VAD ends each turn)."""
    from omni2.clients.tools.espeak import resample, silence, speak

    return [resample(np.concatenate([silence(0.4), speak(q, speed=150 + 10 * i), silence(1.2)]), 16000, rate)
            for i, q in enumerate(QUESTIONS)]


async def keep_talking(index: int, url: str, audio: list[np.ndarray], until: float, turns_per_session: int,
                       run: SoakRun) -> None:
    await asyncio.sleep(0.25 * index)  # stagger, as real users are
    k = index
    while time.monotonic() < until:
        client = await open_session(url, None, run, index)
        if client is None:
            await asyncio.sleep(1.0)
            continue
        async with run.holding(index, client):   # a broken session is counted; the next one connects afresh
            await client.configure(REALTIME_SAMPLE_RATE, vad=True)
            for _ in range(turns_per_session):
                if time.monotonic() >= until:
                    break
                answer = await client.ask(audio=audio[k % len(audio)], rate=REALTIME_SAMPLE_RATE, vad=True, pace=1.0,
                                          timeout=120)
                k += 1
                if answer.status in ("completed", "incomplete") and not answer.errors:
                    run.turns += 1
                else:
                    run.failed += 1
                    if answer.done_at is None:
                        break


async def drive(url: str, port: int, pid: int, sessions: int, seconds: float, turns_per_session: int,
                sample_s: float, say) -> SoakRun:
    run = SoakRun()
    audio = questions()
    start = time.monotonic()
    until = start + seconds
    talkers = [asyncio.create_task(keep_talking(i, url, audio, until, turns_per_session, run))
               for i in range(sessions)]
    next_print = 0.0
    while time.monotonic() < until:
        mem = memory_of(pid)
        rss = mem.get("VmRSS", 0)
        in_use, free = await asyncio.to_thread(heap_figures, port)
        t = time.monotonic() - start
        run.samples.append(Sample(t, rss, run.turns, in_use, free, mem.get("RssAnon")))
        if t >= next_print:
            heap = f"  heap in use {in_use / MB:6.1f} MB, free {free / MB:6.1f} MB" if in_use is not None else ""
            say(f"soak: {t / 60:5.1f} min  RSS {rss / MB:7.1f} MB{heap}  turns {run.turns}  failed {run.failed}")
            next_print = t + 60
        await asyncio.sleep(sample_s)
    await asyncio.wait(talkers, timeout=150)
    for task in talkers:
        task.cancel()
    await asyncio.gather(*talkers, return_exceptions=True)
    return run


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares MB per minute."""
    return float(np.polyfit(t, y, 1)[0]) if len(t) >= 3 and np.ptp(t) > 0 else 0.0


def minutes_of(samples: list[Sample], value) -> list[tuple[int, float, float, float]]:
    """(minute, min, mean, max) of value(sample) in MB, per whole minute of the run."""
    by: dict[int, list[float]] = {}
    for s in samples:
        v = value(s)
        if v is not None:
            by.setdefault(int(s.t // 60), []).append(v / MB)
    return [(m, min(v), sum(v) / len(v), max(v)) for m, v in sorted(by.items())]


def summarize(run: SoakRun, ready_rss: int, after_rss: int, hwm: int, sessions: int, warmup_s: float) -> dict:
    """RSS is judged on its per-minute means and peaks after the warm-up: the periodic trim
    makes each minute a sawtooth between what is in use and the transient working set."""
    after = [s for s in run.samples if s.t >= warmup_s] or run.samples[-1:]
    t = np.array([s.t for s in after]) / 60.0
    rss = np.array([s.rss for s in after], dtype=np.float64) / MB
    slope = _slope(t, rss)
    start, end = rss[0], rss[-1]
    per_min = minutes_of(after, lambda s: s.rss)
    means = np.array([m[2] for m in per_min])
    peaks = np.array([m[3] for m in per_min])
    anon_means = np.array([m[2] for m in minutes_of(after, lambda s: s.anon)])
    heap = [(s.t / 60.0, s.heap_in_use / MB) for s in after if s.heap_in_use is not None]
    heap_t, heap_mb = (np.array(x) for x in zip(*heap)) if heap else (np.zeros(0), np.zeros(0))
    return {
        "sessions": sessions, "minutes": run.samples[-1].t / 60 if run.samples else 0.0,
        "warmup_min": warmup_s / 60, "samples": len(run.samples),
        "turns_answered": run.turns, "turns_failed": run.failed, "refusals": run.refused,
        "connection_capped": run.capped, "errors": len(run.errors),
        "rss_ready_mb": ready_rss / MB, "rss_warm_mb": float(start), "rss_end_mb": float(end),
        "rss_min_after_warmup_mb": float(rss.min()), "rss_max_after_warmup_mb": float(rss.max()),
        "growth_after_warmup_pct": float(100.0 * (end - start) / start),
        "rss_minutes_mb": [[m, round(lo), round(mean), round(hi)] for m, lo, mean, hi in
                           minutes_of(run.samples, lambda s: s.rss)],
        "minute_mean_growth_pct": float(100.0 * (means[-1] - means[0]) / means[0]) if len(means) else 0.0,
        "minute_mean_range_pct": float(100.0 * np.ptp(means) / means.mean()) if len(means) else 0.0,
        "minute_peak_growth_pct": float(100.0 * (peaks[-1] - peaks[0]) / peaks[0]) if len(peaks) else 0.0,
        "anon_minute_mean_growth_pct": (float(100.0 * (anon_means[-1] - anon_means[0]) / anon_means[0])
                                        if len(anon_means) else None),
        "heap_in_use_warm_mb": float(heap_mb[0]) if heap_mb.size else None,
        "heap_in_use_end_mb": float(heap_mb[-1]) if heap_mb.size else None,
        "heap_in_use_slope_mb_per_min": _slope(heap_t, heap_mb) if heap_mb.size else None,
        "range_after_warmup_pct": float(100.0 * (rss.max() - rss.min()) / start),
        "slope_mb_per_min": slope,
        # VmHWM is the kernel's lagging count: a sample read earlier can be above it (seen: by
        # 0.14 MB in an AVX2 CI run), and the peak is at least every RSS seen
        "rss_high_water_mb": max([hwm] + [s.rss for s in run.samples]) / MB,
        "rss_after_clients_left_mb": after_rss / MB,
        "steady_mb_per_session": float((rss.mean() - ready_rss / MB) / max(sessions, 1)),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"omni2 serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"omni2 serve was not ready within {READY_TIMEOUT_S:g} s")


def run_soak(sessions: int = 16, minutes: float = 10.0, warmup_min: Optional[float] = None,
             model: str = "tiny", max_steps: int = 64, turns_per_session: int = 8, sample_s: float = 5.0,
             serve_args: tuple[str, ...] = (), env: Optional[dict] = None, verbose: bool = True) -> dict:
    say = functools.partial(print, flush=True) if verbose else (lambda *a, **k: None)
    from omni2.clients.tools.espeak import missing_tools

    missing = missing_tools()
    if missing:
        raise RuntimeError(f"the soak speaks with {', '.join(missing)}: install it (apt-get install espeak-ng sox)")
    warmup_s = 60.0 * (warmup_min if warmup_min is not None else min(2.0, minutes / 4))
    port = _free_port()
    cmd = [sys.executable, "-m", "omni2.clients.cli", "serve", "--model", model, "--port", str(port),
           "--max-sessions", str(sessions), "--max-steps", str(max_steps), "--log-level", "warning",
           *serve_args]
    say("soak: " + " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    try:
        _wait_ready(port, proc)
        time.sleep(2.0)
        ready_rss, _ = rss_bytes(proc.pid)
        say(f"soak: ready, RSS {ready_rss / MB:.1f} MB; {sessions} sessions for {minutes:g} min "
            f"(warm-up {warmup_s / 60:g} min)")
        run = asyncio.run(drive(f"ws://127.0.0.1:{port}/v1/realtime", port, proc.pid, sessions, 60.0 * minutes,
                                turns_per_session, sample_s, say))
        time.sleep(15.0)  # longer than the server's trim interval (10 s by default)
        after_rss, hwm = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = summarize(run, ready_rss, after_rss, hwm, sessions, warmup_s)
    result.update(model=model, max_steps=max_steps, turns_per_session=turns_per_session,
                  serve_args=list(serve_args), error_samples=run.errors[:5],
                  rss_series_mb=[[round(s.t, 1), round(s.rss / MB, 1), s.turns,
                                  None if s.heap_in_use is None else round(s.heap_in_use / MB, 1)]
                                 for s in run.samples])
    r = result
    capped = f", {r['connection_capped']} at the connection cap" if r["connection_capped"] else ""
    say(f"soak: {r['turns_answered']} turns answered ({r['turns_failed']} failed, {r['refusals']} refused{capped}, "
        f"{r['errors']} errors) by {sessions} sessions in {r['minutes']:.1f} min")
    say(f"  RSS ready {r['rss_ready_mb']:.0f} MB -> after warm-up {r['rss_warm_mb']:.0f} MB -> end "
        f"{r['rss_end_mb']:.0f} MB (after warm-up: {r['rss_min_after_warmup_mb']:.0f}..{r['rss_max_after_warmup_mb']:.0f} MB)")
    say(f"  per minute after warm-up: mean RSS {r['minute_mean_growth_pct']:+.1f}% first to last (range "
        f"{r['minute_mean_range_pct']:.1f}%; target within +-10%), peak {r['minute_peak_growth_pct']:+.1f}%; "
        f"slope {r['slope_mb_per_min']:+.1f} MB/min")
    say(f"  last sample vs warm-up end {r['growth_after_warmup_pct']:+.1f}%; high-water "
        f"{r['rss_high_water_mb']:.0f} MB; {r['rss_after_clients_left_mb']:.0f} MB once the clients left")
    if r["anon_minute_mean_growth_pct"] is not None:
        say(f"  anonymous RSS (RSS less mapped files) per-minute mean {r['anon_minute_mean_growth_pct']:+.1f}% "
            f"first to last after warm-up")
    if r["heap_in_use_warm_mb"] is not None:
        say(f"  C heap in use {r['heap_in_use_warm_mb']:.0f} -> {r['heap_in_use_end_mb']:.0f} MB "
            f"({r['heap_in_use_slope_mb_per_min']:+.2f} MB/min)")
    say(f"  steady memory per session {r['steady_mb_per_session']:.1f} MB")
    return result


def main_args(args) -> dict:
    """`omni2 bench soak` (clients/tools/bench.py parses the flags)."""
    extra = tuple(a for a in (args.serve_args or []) if a != "--")
    return run_soak(sessions=args.sessions, minutes=args.minutes, warmup_min=args.warmup_min, model=args.model,
                    max_steps=args.max_steps, turns_per_session=args.turns_per_session, sample_s=args.sample_s,
                    serve_args=extra)
