"""Sessions that stream their microphone the whole time, as people really use a voice agent.

Each session sends 100 ms of microphone audio every 100 ms at real time for as long as it
lives: a faint noise floor when the user is quiet, a spoken question now and then (the
server's VAD cuts the turn), and, with `stop_share`, "stop omni" spoken over that share of
the answers while they play. Per answer it records the time to first audio (from the
server's speech_stopped) and the playback gaps a client with a `jitter_ms` buffer would hear.

Sessions are spread over `procs` load processes (each one asyncio loop), so the load
generator is never the bottleneck and runs can pass the 256 sessions one loop holds. Each
process reports how late it sent its audio (its own lag: if that grows, the figures are the
generator's, not the server's) and its CPU time. Opening the sessions, counting how they went
and each answer's figures are clients/driver.py's; what the server spent meanwhile (its
process tree's CPU, its gateways' loop lag) is clients/server_cost.py's.
"""
from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from omni2.streaming.audio import REALTIME_SAMPLE_RATE

from .driver import CAP_NOTE, SessionTally, open_session
from .figures import AnswerTracker, answer_figures, percentile
from .server_cost import cpu_window, server_pid_for_port
from .server_cost import worker_lag_buckets  # noqa: F401  (tests/test_server_workers.py reads it here)
from .realtime_client import Pacer, is_loopback, pcm16_bytes

CHUNK_S = 0.1
NOISE_RMS = 0.0005              # about -66 dBFS: a quiet room through a laptop microphone
STOP_PHRASE = "stop omni"


@dataclass(frozen=True)
class LivePlan:
    seconds: float                       # how long each session streams
    question_every_s: Optional[float]    # quiet between an answer's end and the next question; None: never ask
    stop_share: float = 0.0              # answers the user talks over with the stop phrase
    jitter_ms: float = 200.0
    ramp_s: float = 2.0                  # sessions start spread over this long
    answer_timeout_s: float = 30.0


def mic_audio() -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """(questions, stop phrase) at 24 kHz, spoken by espeak-ng."""
    from omni2.clients.tools.espeak import missing_tools

    missing = missing_tools()
    if missing:  # the server's VAD must hear speech: a tone would not be cut into turns
        raise RuntimeError(f"live microphones speak with {', '.join(missing)}: install it "
                           "(apt-get install espeak-ng sox)")
    from omni2.clients.tools.espeak import resample, speak

    from .tools.soak import questions

    return questions(REALTIME_SAMPLE_RATE), resample(speak(STOP_PHRASE, speed=160), 16000, REALTIME_SAMPLE_RATE)


class Mic:
    """What one user's microphone picks up, 100 ms at a time."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.queue: list[np.ndarray] = []       # speech to say next

    def say(self, audio: np.ndarray) -> None:
        self.queue.append(audio)

    @property
    def speaking(self) -> bool:
        return bool(self.queue)

    def next_chunk(self) -> np.ndarray:
        n = int(REALTIME_SAMPLE_RATE * CHUNK_S)
        out = (self.rng.standard_normal(n) * NOISE_RMS).astype(np.float32)
        if self.queue:
            piece, rest = self.queue[0][:n], self.queue[0][n:]
            out[: piece.size] += piece
            if rest.size:
                self.queue[0] = rest
            else:
                self.queue.pop(0)
        return out


@dataclass
class ProcResult:
    answers: list = field(default_factory=list)     # AnswerFigures as dicts
    sessions: SessionTally = field(default_factory=SessionTally)
    send_lag_ms: list = field(default_factory=list)  # how late each send was done, sampled
    cpu_s: float = 0.0


async def live_session(index: int, url: str, plan: LivePlan, questions: list[np.ndarray],
                       stop: Optional[np.ndarray], out: ProcResult, api_key: Optional[str] = None) -> None:
    rng = random.Random(index)
    await asyncio.sleep(plan.ramp_s * rng.random())
    client = await open_session(url, api_key, out.sessions, index)
    if client is None:
        return
    mic = Mic(index)
    tracker = AnswerTracker(plan.jitter_ms / 1000)
    state = {"stop_at": None, "next_q": None, "waiting": False, "queued_at": 0.0}
    end = time.monotonic() + plan.seconds

    def schedule_question(after_s: float) -> None:
        if plan.question_every_s is not None:
            state["next_q"] = time.monotonic() + after_s * (0.5 + rng.random())

    async def receive() -> None:
        while True:
            event = json.loads(await client.conn.recv())   # not client.recv: it keeps every event
            now, was_playing = time.monotonic(), tracker.playing
            done = tracker.feed(event, now)
            if event["type"] == "response.created":
                state["stop_at"] = None
            elif not was_playing and tracker.playing and stop is not None and rng.random() < plan.stop_share:
                state["stop_at"] = now + 1.0 + plan.jitter_ms / 1000   # talk over it once it plays
            if done is not None:
                out.answers.append(asdict(done))
                state.update(stop_at=None, waiting=False)
                schedule_question(max(0.0, tracker.heard_until - now) + (plan.question_every_s or 0.0))

    receiver = None
    async with out.sessions.holding(index, client):
        try:
            await client.configure(REALTIME_SAMPLE_RATE, vad=True)
            receiver = asyncio.create_task(receive())
            schedule_question(1.0)
            pacer = Pacer(CHUNK_S)
            while time.monotonic() < end and not receiver.done():
                now = time.monotonic()
                if state["next_q"] is not None and now >= state["next_q"] and not state["waiting"]:
                    mic.say(questions[(index + len(out.answers)) % len(questions)])
                    tracker.new_question()
                    state.update(next_q=None, waiting=True, queued_at=now)
                if state["stop_at"] is not None and now >= state["stop_at"]:
                    mic.say(stop)
                    tracker.stopped_by_user = True
                    state["stop_at"] = None
                chunk = base64.b64encode(pcm16_bytes(mic.next_chunk())).decode()
                await client.send("input_audio_buffer.append", audio=chunk)
                late = await pacer.sent_one()
                if pacer.sent % 10 == 0:
                    out.send_lag_ms.append(1000 * late)
                if (state["waiting"] and not tracker.playing
                        and time.monotonic() - state["queued_at"] > plan.answer_timeout_s):
                    out.answers.append(asdict(answer_figures("timeout", [], None, tracker.jitter_s)))  # none came
                    tracker.new_question()
                    state["waiting"] = False
                    schedule_question(plan.question_every_s or 0.0)
            if tracker.playing:   # an answer still playing when the run ended: its figures so far
                out.answers.append(asdict(tracker.figures("open")))
            if receiver.done() and receiver.exception() is not None:
                out.sessions.failed(index, receiver.exception())
        finally:
            if receiver is not None:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)


def _proc_main(first: int, count: int, url: str, plan: LivePlan, api_key: Optional[str], queue, ready) -> None:
    questions, stop = mic_audio()   # (espeak: seconds) before the clock starts
    ready.wait()
    start = os.times()      # the run's CPU only: not the imports and speech synthesis before it
    out = ProcResult()

    async def main():
        await asyncio.gather(*(live_session(first + i, url, plan, questions, stop, out, api_key)
                               for i in range(count)))

    asyncio.run(main())
    t = os.times()
    out.cpu_s = (t.user - start.user) + (t.system - start.system)
    queue.put(out)


def run_live(url: str, sessions: int, procs: int, plan: LivePlan, api_key: Optional[str] = None,
             during=None) -> dict:
    """Run `sessions` live sessions spread over `procs` processes; `during()` is called in this
    process while they run (it may sleep to sample the server), and its result is returned
    under "during"."""
    procs = max(1, min(procs, sessions or 1))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ready = ctx.Barrier(procs + 1)
    shares = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
    workers, first = [], 0
    for count in shares:
        workers.append(ctx.Process(target=_proc_main, args=(first, count, url, plan, api_key, queue, ready),
                                   daemon=True))
        first += count
    for w in workers:
        w.start()
    ready.wait(timeout=300)   # every load process has its audio: the sessions start now
    started = time.monotonic()
    measured = during() if during is not None else None
    results = [queue.get(timeout=plan.seconds + plan.ramp_s + 120) for _ in workers]
    for w in workers:
        w.join(10)
    merged = ProcResult()
    for r in results:
        merged.answers += r.answers
        merged.sessions.add(r.sessions)
        merged.send_lag_ms += r.send_lag_ms
        merged.cpu_s += r.cpu_s
    summary = summarize(merged, time.monotonic() - started)
    summary["during"] = measured
    return summary


def summarize(r: ProcResult, wall_s: float) -> dict:
    answered = [a for a in r.answers
                if a["status"] in ("completed", "incomplete", "cancelled", "open") and a["audio_s"] > 0]
    ttfa = [a["ttfa_s"] for a in answered if a["ttfa_s"] is not None]
    whole = [a for a in answered if not a["stopped_by_user"] and a["status"] not in ("cancelled", "open")]
    with_gaps = sum(1 for a in answered if a["gaps"])
    rates = [a["rate"] for a in answered if a.get("rate") is not None and not a["stopped_by_user"]]
    ms = (lambda x: None if x is None else round(1000 * x, 1))
    return {
        "sessions_connected": r.sessions.connected, "refused": r.sessions.refused,
        "connection_capped": r.sessions.capped, "errors": len(r.sessions.errors),
        "error_samples": r.sessions.errors[:3], "answers": len(answered), "answers_whole": len(whole),
        "answers_stopped_by_user": sum(1 for a in answered if a["stopped_by_user"]),
        "answers_failed": len(r.answers) - len(answered),
        "answers_with_gaps": with_gaps,
        "answers_with_gaps_pct": round(100.0 * with_gaps / len(answered), 2) if answered else None,
        "gaps": sum(a["gaps"] for a in answered),
        "audio_s": round(sum(a["audio_s"] for a in answered), 1),
        **{f"ttfa_p{q}_ms": ms(percentile(ttfa, q)) for q in (50, 90, 95)},
        **{f"audio_rate_p{q}": (None if not rates else round(percentile(rates, q), 3)) for q in (10, 50)},
        "generator_send_lag_p99_ms": round(percentile(r.send_lag_ms, 99) or 0.0, 1),
        "generator_cpu_s": round(r.cpu_s, 2), "wall_s": round(wall_s, 1),
    }


def main_live(args) -> int:
    """--live: continuous microphones over several processes; server CPU per session."""
    from urllib.parse import urlsplit

    parts = urlsplit(args.url)
    pid = args.server_pid
    if pid is None and is_loopback(args.url):
        pid = server_pid_for_port(parts.port or 80)
    procs = args.procs or max(1, min(8, os.cpu_count() or 1))
    plan = LivePlan(seconds=args.live, question_every_s=args.question_every or None, stop_share=args.stop_share,
                    jitter_ms=args.jitter_ms, ramp_s=min(10.0, 1.0 + 0.02 * args.sessions),
                    answer_timeout_s=args.turn_timeout)
    idle = None
    if pid is not None:
        idle = cpu_window(pid, parts.port or 80, 0.0, 3.0)["cores"]
    warm = plan.ramp_s + min(3.0, args.live / 4)
    span = max(1.0, args.live - warm - 1.0)
    during = (lambda: cpu_window(pid, parts.port or 80, warm, span)) if pid is not None else None
    try:
        s = run_live(args.url, args.sessions, procs, plan, api_key=args.api_key, during=during)
    except KeyboardInterrupt:
        return 130
    d = s.pop("during")

    def f(x, unit=""):
        return "-" if x is None else f"{x:g}{unit}"

    rows = [
        ("sessions (live microphones)", f"{s['sessions_connected']} of {args.sessions} connected over {procs} "
                                        f"load processes, {args.live:g} s each"),
        ("refused (1013) / connection cap", f"{s['refused']} / {s['connection_capped']}"),
        ("errors", f"{s['errors']}"),
        ("answers (whole / stopped by user)", f"{s['answers']} ({s['answers_whole']} / {s['answers_stopped_by_user']})"),
        ("answers failed or timed out", f"{s['answers_failed']}"),
        ("answers with playback gaps", f"{s['answers_with_gaps']} ({f(s['answers_with_gaps_pct'], '%')}); "
                                       f"{args.jitter_ms:g} ms jitter buffer"),
        ("first audio p50 / p90 / p95", f"{f(s['ttfa_p50_ms'])} / {f(s['ttfa_p90_ms'])} / {f(s['ttfa_p95_ms'])} ms "
                                        "(from speech_stopped)"),
        ("answer audio per wall second p10 / p50", f"{f(s['audio_rate_p10'])} / {f(s['audio_rate_p50'])} "
                                                    "(first to last delta; < 1: the listener falls behind)"),
        ("load generator send lag p99", f"{s['generator_send_lag_p99_ms']:g} ms (large: the figures are the "
                                        "generator's)"),
        ("load generator CPU", f"{s['generator_cpu_s']:g} s in {s['wall_s']:g} s "
                               f"({s['generator_cpu_s'] / max(s['wall_s'], 1e-9):.3f} cores, all load processes)"),
        ("answer audio received", f"{s['audio_s']:g} s"),
    ]
    if d is not None:
        per = (d["cores"] - idle) / max(1, s["sessions_connected"])
        rows += [("server CPU, whole process tree", f"{d['cores']:.3f} cores at load, {idle:.3f} idle (pid {pid})"),
                 ("server CPU per session", f"{per:.4f} cores"),
                 ("server event-loop lag p99", f"{f(d['lag_p99_ms'], ' ms')}")]
    else:
        rows.append(("server CPU per session", "- (server not on this host: pass --server-pid)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if s["connection_capped"]:
        print(CAP_NOTE, file=sys.stderr)
    for e in s["error_samples"]:
        print(f"error: {e}", file=sys.stderr)
    return 0 if s["sessions_connected"] and not s["errors"] else 1
