"""`omni2 loadtest`: N concurrent sessions, M spoken questions each, against a running server.

Every session streams real PCM16 chunks (paced at real time unless `--fast`), commits, and
collects the answer. Per turn it measures time to first audio (from the end of the question)
and the real-time factor (answer wall time / answer audio seconds: below 1 means the server
speaks faster than it is played). Real-time on average is not enough for a listener, so
each answer is also played through a simulated client jitter buffer (`--jitter-ms`) and
its playback underruns are counted. Refusals (close 1013, server busy) and sessions the
server's connection cap turned away (HTTP 503) are counted apart from errors (clients/driver.py
opens and counts the sessions; each answer's figures are the ones its `ask()` measured,
clients/figures.py). Progress goes to stderr while it runs. The run is bounded: sessions and
turns are capped, `--duration-limit` stops it, and only loopback servers are targeted unless
`--allow-remote` is given.

`--live SECONDS` runs the way people use a voice agent instead (clients/live_load.py): every
session streams its microphone continuously at real time for that long (a quiet room between
questions, a question every `--question-every` seconds after the last answer played, "stop
omni" spoken over `--stop-share` of the answers), sessions spread over `--procs` load
processes (so past 256 sessions). The table gives playback gaps (jitter buffer), first audio
p50/p90/p95 and, when the server runs on this host (`--server-pid`, or found by its port),
the server's CPU per session: its whole process tree's CPU at load minus idle, per session.
A loopback load comes from one address: the server's per-client connection cap (32 by
default) must be lifted for it: `omni2 serve --max-connections-per-client 0` (or
OMNI2_MAX_CONNECTIONS_PER_CLIENT=0); sessions it refused are counted as "connection cap".
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from omni2.streaming.audio import REALTIME_SAMPLE_RATE

from .driver import CAP_NOTE, SessionTally, open_session
from .figures import JITTER_S, count_underruns, percentile  # noqa: F401  (also this module's API)
from .realtime_client import RealtimeError, add_server_arguments, is_loopback, read_audio, realtime_url

MAX_SESSIONS = 256
MAX_TURNS = 100
DURATION_LIMIT_S = 300.0
RAMP_S = 0.02                 # stagger session starts so the handshakes do not all collide
JITTER_MS = JITTER_S * 1000   # the simulated client's playback buffer
PROGRESS_EVERY_S = 5.0        # one progress line this often when stderr is not a terminal


@dataclass
class TurnResult:
    session: int
    turn: int
    status: str
    ttfa_s: Optional[float]
    audio_s: float
    wall_s: Optional[float]
    error: Optional[str] = None
    underruns: int = 0

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "incomplete") and self.error is None


@dataclass
class Report(SessionTally):
    turns: list[TurnResult] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False
    turns_skipped: int = 0        # never asked: their session was refused, failed or stopped

    @property
    def completed(self) -> list[TurnResult]:
        return [t for t in self.turns if t.ok]

    def summary(self) -> dict:
        ok = self.completed
        ttfa = [t.ttfa_s for t in ok if t.ttfa_s is not None]
        rtf = [t.wall_s / t.audio_s for t in ok if t.audio_s > 0 and t.wall_s is not None]
        audio = sum(t.audio_s for t in self.turns)
        return {
            "turns_completed": len(ok), "turns_failed": len(self.turns) - len(ok),
            "refusals": self.refused, "connection_capped": self.capped, "errors": len(self.errors),
            **{f"ttfa_p{q}_ms": _ms(percentile(ttfa, q)) for q in (50, 90, 95)},
            **{f"rtf_p{q}": percentile(rtf, q) for q in (50, 90, 95)},
            "answers_with_underruns": sum(1 for t in ok if t.underruns),
            "underruns": sum(t.underruns for t in ok),
            "audio_s": audio, "wall_s": self.wall_s,
            "audio_per_wall": audio / self.wall_s if self.wall_s > 0 else 0.0,
            "stopped_early": self.stopped_early,
        }


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1000.0


class Progress:
    """Turns finished of those planned, on stderr while the run goes: a tqdm bar on a terminal,
    otherwise a plain line every `every_s` (a bar's carriage returns would garble a log)."""

    def __init__(self, total: int, stream=None, bar: Optional[bool] = None, every_s: float = PROGRESS_EVERY_S):
        self.total, self.every_s = total, every_s
        self.stream = stream or sys.stderr
        if bar is None:
            bar = self.stream.isatty()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="turn", desc="loadtest", file=self.stream)
        self.start = self.printed_at = time.monotonic()

    def show(self, report: Report, final: bool = False) -> None:
        done = len(report.turns) + report.turns_skipped
        ok = len(report.completed)
        counts = {"ok": ok, "failed": len(report.turns) - ok, "refused": report.refused}
        if self.bar is not None:
            self.bar.set_postfix(counts, refresh=False)
            self.bar.update(done - self.bar.n)
            self.bar.refresh()
            return
        now = time.monotonic()
        if final or now - self.printed_at >= self.every_s:
            self.printed_at = now
            print(f"loadtest: {done}/{self.total} turns ({', '.join(f'{v} {k}' for k, v in counts.items())}) "
                  f"after {now - self.start:.0f} s", file=self.stream, flush=True)

    async def follow(self, report: Report) -> None:
        while True:
            self.show(report)
            await asyncio.sleep(min(self.every_s, 0.25))

    def close(self, report: Report) -> None:
        self.show(report, final=True)
        if self.bar is not None:
            self.bar.close()


def default_question(rate: int = REALTIME_SAMPLE_RATE, seconds: float = 1.5) -> np.ndarray:
    """A voiced-like tone sweep: a stand-in question when no --audio is given (commit mode
    does not need the server's VAD to hear speech in it)."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) * 10)
    return (0.2 * voiced * envelope).astype(np.float32)


async def run_session(index: int, args, audio: np.ndarray, rate: int, report: Report) -> None:
    await asyncio.sleep(index * RAMP_S)
    client = await open_session(args.url, args.api_key, report, index)
    if client is None:
        report.turns_skipped += args.turns
        return
    asked = 0
    async with report.holding(index, client):
        try:
            await client.configure(rate, vad=args.vad)
            for turn in range(args.turns):
                answer = await client.ask(audio=audio, rate=rate, vad=args.vad, pace=0.0 if args.fast else 1.0,
                                          timeout=args.turn_timeout, jitter_s=args.jitter_ms / 1000)
                if answer.refusal is not None and RealtimeError(answer.refusal.get("code"), "").refused:
                    report.refused += 1         # no free slot for the answer: busy, not broken
                    break
                asked += 1
                f = answer.figures
                report.turns.append(TurnResult(index, turn, f.status, f.ttfa_s, f.audio_s, f.wall_s,
                                               "; ".join(answer.errors) or None, f.gaps))
                if answer.done_at is None:      # refused, timed out or the socket died: session over
                    break
        finally:
            report.turns_skipped += args.turns - asked


async def run_load(args, audio: np.ndarray, rate: int, progress: Optional[Progress] = None) -> Report:
    report = Report()
    start = time.monotonic()
    tasks = [asyncio.create_task(run_session(i, args, audio, rate, report)) for i in range(args.sessions)]
    follower = asyncio.create_task(progress.follow(report)) if progress else None
    done, pending = await asyncio.wait(tasks, timeout=args.duration_limit)
    if follower:
        follower.cancel()
    for task in pending:
        task.cancel()
    if pending:
        report.stopped_early = True
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            report.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
    report.wall_s = time.monotonic() - start
    if progress:
        progress.close(report)
    return report


def format_table(report: Report, sessions: int, turns: int, jitter_ms: float = JITTER_MS) -> str:
    s = report.summary()

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [
        ("sessions x turns", f"{sessions} x {turns}"),
        ("turns completed", f"{s['turns_completed']}"),
        ("turns failed", f"{s['turns_failed']}"),
        ("refusals (1013)", f"{s['refusals']}"),
        ("connection cap (503)", f"{s['connection_capped']}"),
        ("errors", f"{s['errors']}"),
        ("time to first audio p50", f"{f(s['ttfa_p50_ms'], '.0f')} ms"),
        ("time to first audio p90", f"{f(s['ttfa_p90_ms'], '.0f')} ms"),
        ("time to first audio p95", f"{f(s['ttfa_p95_ms'], '.0f')} ms"),
        ("real-time factor p50", f(s["rtf_p50"], ".3f")),
        ("real-time factor p90", f(s["rtf_p90"], ".3f")),
        ("real-time factor p95", f(s["rtf_p95"], ".3f")),
        ("jitter buffer", f"{jitter_ms:g} ms (playback starts once that much audio is in, then runs in real time)"),
        ("answers with underruns", f"{s['answers_with_underruns']} of {s['turns_completed']}"),
        ("playback underruns", f"{s['underruns']}"),
        ("audio received", f"{s['audio_s']:.2f} s"),
        ("wall time", f"{s['wall_s']:.2f} s" + (" (duration limit hit)" if s["stopped_early"] else "")),
        ("audio s per wall s", f"{s['audio_per_wall']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--sessions", type=int, default=4, help=f"concurrent sessions (1..{MAX_SESSIONS})")
    parser.add_argument("--turns", type=int, default=1, help=f"questions per session (1..{MAX_TURNS})")
    parser.add_argument("--audio", metavar="WAV", help="spoken question (default: a 1.5 s synthetic tone)")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible, not in real time")
    parser.add_argument("--vad", action="store_true",
                        help="server VAD ends each question (needs real speech with trailing silence)")
    parser.add_argument("--duration-limit", type=float, default=DURATION_LIMIT_S, help="stop the whole run after S seconds")
    parser.add_argument("--turn-timeout", type=float, default=120.0, help="give up on one answer after S seconds")
    parser.add_argument("--jitter-ms", type=float, default=JITTER_MS,
                        help=f"simulated client playback buffer for counting underruns (default {JITTER_MS:g})")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server")
    live = parser.add_argument_group("live microphones (--live)")
    live.add_argument("--live", type=float, default=None, metavar="SECONDS",
                      help="every session streams its microphone continuously for SECONDS (real usage)")
    live.add_argument("--procs", type=int, default=0,
                      help="load processes the sessions are spread over (default: CPU count, at most 8); "
                           f"up to {MAX_SESSIONS} sessions each")
    live.add_argument("--question-every", type=float, default=3.0, metavar="S",
                      help="quiet after an answer has played before the next question (0: never ask)")
    live.add_argument("--stop-share", type=float, default=0.0,
                      help='share of answers the user stops by saying "stop omni" while they play')
    live.add_argument("--server-pid", type=int, default=None,
                      help="the server's pid for CPU per session (default: the owner of --url's port, "
                           "if on this host)")


def check_args(args) -> Optional[str]:
    live = getattr(args, "live", None) is not None
    limit = MAX_SESSIONS * max(1, min(8, os.cpu_count() or 1) if not args.procs else args.procs) if live \
        else MAX_SESSIONS
    if not 1 <= args.sessions <= limit:
        return f"--sessions must be 1..{limit}" + (" (more with --procs)" if live else "")
    if live and (args.live <= 0 or args.question_every < 0 or not 0 <= args.stop_share <= 1 or args.procs < 0):
        return "--live must be > 0, --question-every >= 0, --stop-share in 0..1, --procs >= 0"
    ignored = [flag for flag, used in (("--turns", args.turns != 1), ("--audio", args.audio is not None),
                                       ("--fast", args.fast), ("--vad", args.vad),
                                       ("--duration-limit", args.duration_limit != DURATION_LIMIT_S)) if used]
    if live and ignored:   # said, not silently ignored: the run would not be the one asked for
        return (f"{', '.join(ignored)} do(es) not apply to --live: its microphones stream for --live seconds, "
                "ask espeak-ng questions every --question-every seconds and the server's VAD cuts the turns")
    if not 1 <= args.turns <= MAX_TURNS:
        return f"--turns must be 1..{MAX_TURNS}"
    if args.duration_limit <= 0 or args.turn_timeout <= 0:
        return "--duration-limit and --turn-timeout must be > 0"
    if args.jitter_ms < 0:
        return "--jitter-ms must be >= 0"
    if not is_loopback(args.url) and not args.allow_remote:
        return f"{args.url} is not a loopback address; pass --allow-remote to load another host"
    return None


def main(args: argparse.Namespace) -> int:
    try:
        args.url = realtime_url(args.url)
        problem = check_args(args)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        print(f"omni2 loadtest: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "live", None) is not None:
        from .live_load import main_live

        return main_live(args)
    try:
        audio, rate = read_audio(args.audio) if args.audio else (default_question(), REALTIME_SAMPLE_RATE)
    except (OSError, ValueError) as exc:
        print(f"omni2 loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_load(args, audio, rate, Progress(args.sessions * args.turns)))
    except KeyboardInterrupt:
        return 130
    print(format_table(report, args.sessions, args.turns, args.jitter_ms))
    if report.capped:
        print(CAP_NOTE, file=sys.stderr)
    for e in report.errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    for t in [t for t in report.turns if not t.ok][:10]:
        print(f"turn {t.session}.{t.turn}: {t.status} {t.error or ''}", file=sys.stderr)
    return 0 if report.completed and not report.errors else 1

