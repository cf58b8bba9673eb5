"""`omni2 loadtest`: N concurrent sessions, M spoken questions each, against a running server.

Every session streams real PCM16 chunks (paced at real time unless `--fast`), commits, and
collects the answer. Per turn it measures time to first audio (from the end of the question)
and the real-time factor (answer wall time / answer audio seconds: below 1 means the server
speaks faster than it is played). Refusals (close 1013, server busy) are counted apart from
errors. The run is bounded: sessions and turns are capped, `--duration-limit` stops it, and
only loopback servers are targeted unless `--allow-remote` is given.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .realtime_client import RealtimeClient, RealtimeError, add_server_arguments, is_loopback, read_audio, realtime_url

MAX_SESSIONS = 256
MAX_TURNS = 100
RAMP_S = 0.02                 # stagger session starts so the handshakes do not all collide


@dataclass
class TurnResult:
    session: int
    turn: int
    status: str
    ttfa_s: Optional[float]
    audio_s: float
    wall_s: Optional[float]
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "incomplete") and self.error is None


@dataclass
class Report:
    turns: list[TurnResult] = field(default_factory=list)
    refusals: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: bool = False

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
            "refusals": self.refusals, "errors": len(self.errors),
            "ttfa_p50_ms": _ms(percentile(ttfa, 50)), "ttfa_p90_ms": _ms(percentile(ttfa, 90)),
            "rtf_p50": percentile(rtf, 50), "rtf_p90": percentile(rtf, 90),
            "audio_s": audio, "wall_s": self.wall_s,
            "audio_per_wall": audio / self.wall_s if self.wall_s > 0 else 0.0,
            "stopped_early": self.stopped_early,
        }


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1000.0


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (no interpolation: a reported latency was really seen)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def default_question(rate: int = 24000, seconds: float = 1.5) -> np.ndarray:
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
    try:
        client = await RealtimeClient.connect(args.url, api_key=args.api_key)
    except RealtimeError as exc:
        if exc.refused:
            report.refusals += 1
        else:
            report.errors.append(f"session {index}: {exc}")
        return
    try:
        await client.configure(rate, vad=args.vad)
        for turn in range(args.turns):
            answer = await client.ask(audio=audio, rate=rate, vad=args.vad,
                                      pace=0.0 if args.fast else 1.0, timeout=args.turn_timeout)
            error = "; ".join(answer.errors) or None
            report.turns.append(TurnResult(index, turn, answer.status, answer.ttfa_s, answer.audio_s,
                                           answer.wall_s, error))
            if answer.done_at is None:      # timed out or the socket died: this session is over
                break
    except RealtimeError as exc:
        report.errors.append(f"session {index}: {exc}")
    finally:
        await client.close()


async def run_load(args, audio: np.ndarray, rate: int) -> Report:
    report = Report()
    start = time.monotonic()
    tasks = [asyncio.create_task(run_session(i, args, audio, rate, report)) for i in range(args.sessions)]
    done, pending = await asyncio.wait(tasks, timeout=args.duration_limit)
    for task in pending:
        task.cancel()
    if pending:
        report.stopped_early = True
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            report.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
    report.wall_s = time.monotonic() - start
    return report


def format_table(report: Report, sessions: int, turns: int) -> str:
    s = report.summary()

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [
        ("sessions x turns", f"{sessions} x {turns}"),
        ("turns completed", f"{s['turns_completed']}"),
        ("turns failed", f"{s['turns_failed']}"),
        ("refusals (1013)", f"{s['refusals']}"),
        ("errors", f"{s['errors']}"),
        ("time to first audio p50", f"{f(s['ttfa_p50_ms'], '.0f')} ms"),
        ("time to first audio p90", f"{f(s['ttfa_p90_ms'], '.0f')} ms"),
        ("real-time factor p50", f(s["rtf_p50"], ".3f")),
        ("real-time factor p90", f(s["rtf_p90"], ".3f")),
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
    parser.add_argument("--duration-limit", type=float, default=300.0, help="stop the whole run after S seconds")
    parser.add_argument("--turn-timeout", type=float, default=120.0, help="give up on one answer after S seconds")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server")


def check_args(args) -> Optional[str]:
    if not 1 <= args.sessions <= MAX_SESSIONS:
        return f"--sessions must be 1..{MAX_SESSIONS}"
    if not 1 <= args.turns <= MAX_TURNS:
        return f"--turns must be 1..{MAX_TURNS}"
    if args.duration_limit <= 0 or args.turn_timeout <= 0:
        return "--duration-limit and --turn-timeout must be > 0"
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
    try:
        audio, rate = read_audio(args.audio) if args.audio else (default_question(), 24000)
    except (OSError, ValueError) as exc:
        print(f"omni2 loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_load(args, audio, rate))
    except KeyboardInterrupt:
        return 130
    print(format_table(report, args.sessions, args.turns))
    for e in report.errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    for t in [t for t in report.turns if not t.ok][:10]:
        print(f"turn {t.session}.{t.turn}: {t.status} {t.error or ''}", file=sys.stderr)
    return 0 if report.completed and not report.errors else 1
