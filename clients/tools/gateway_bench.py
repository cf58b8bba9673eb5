"""`omni2 bench gateway`: what one host's server costs per session, without the model.

Starts `omni2 serve --model null` (streaming/engine/null_engine.py: canned answers at a set rate,
no model time) as a child process, once per interrupt mode and worker count, and drives it
with live sessions (clients/live_load.py: every session streams its microphone at real time)
from separate load processes. Per run:

- server CPU per session: the CPU time of the server's whole process tree (engine and
  gateway processes, from /proc) over a window at N sessions, minus the same window at 0
  sessions, divided by N (in cores: 1.0 is one core busy);
- listening (idle: a quiet room, no questions) and active (a question, its answer, a pause,
  again) sessions;
- sessions held in real time: every answer played without a gap through a 200 ms jitter
  buffer, first audio p90 under 300 ms, and the gateway's event-loop lag p99 (from its
  /metrics) under 50 ms;
- the load generator's own send lag, so a saturated generator is seen, not mistaken for
  the server.

`--workers` is passed to `omni2 serve` only when that server accepts it (read from its
--help); otherwise the worker counts asked for beyond 1 are reported as not run. `--serve-cmd`
measures another installation (e.g. an older checkout) with the same load.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Optional

from ..live_load import LivePlan, run_live
from ..server_cost import cpu_window
from .soak import _free_port as free_port
from .soak import _wait_ready as wait_ready

TTFA_P90_TARGET_MS = 300.0
LAG_P99_TARGET_MS = 50.0


def serve_command(serve_cmd: Optional[str]) -> list[str]:
    return shlex.split(serve_cmd) if serve_cmd else [sys.executable, "-m", "omni2.clients.cli", "serve"]


def accepts_workers(cmd: list[str]) -> bool:
    """Whether this `omni2 serve` has a --workers flag (the multi-process server)."""
    try:
        out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out


def start_server(cmd: list[str], port: int, model: str, mode: str, workers: Optional[int],
                 max_sessions: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = cmd + ["--model", model, "--port", str(port), "--interrupt", mode,
                  "--max-sessions", str(max_sessions), "--max-connections", "0",
                  "--max-connections-per-client", "0",  # every load session comes from 127.0.0.1
                  "--idle-timeout", "3600", "--log-level", "warning", *extra]
    if workers is not None:
        args += ["--workers", str(workers)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure(proc, port: int, sessions: int, procs: int, plan: LivePlan, warm_s: float, span_s: float) -> dict:
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    return run_live(url, sessions, procs, plan,
                    during=lambda: cpu_window(proc.pid, port, plan.ramp_s + warm_s, span_s))


def run_gateway_bench(sessions: tuple[int, ...] = (8,), modes: tuple[str, ...] = ("vad", "command"),
                      workers: tuple[int, ...] = (1, 2), model: str = "null", span_s: float = 8.0,
                      warm_s: float = 3.0, procs: int = 0, question_every_s: float = 2.0,
                      serve_cmd: Optional[str] = None, serve_args: tuple[str, ...] = (),
                      say=print) -> dict:
    cmd = serve_command(serve_cmd)
    multi = accepts_workers(cmd)
    procs = procs or max(1, min(8, (os.cpu_count() or 2)))
    rows, skipped = [], []
    for mode in modes:
        for w in workers:
            if w != 1 and not multi:
                skipped.append(f"{mode} workers={w}: this omni2 serve has no --workers")
                continue
            port = free_port()
            say(f"gateway bench: {mode} mode, {w} worker(s): starting {' '.join(cmd[-2:])} --model {model}")
            proc = start_server(cmd, port, model, mode, w if multi else None, max(sessions) + 4, serve_args)
            try:
                time.sleep(2.0)
                base = cpu_window(proc.pid, port, 0.0, span_s)
                say(f"  0 sessions: server tree {base['cores']:.3f} cores")
                for n in sessions:
                    for kind, every in (("idle", None), ("active", question_every_s)):
                        # each session streams `seconds` from its own start, somewhere in the
                        # ramp: as long as ramp + window, so the last second of the window
                        # still has every session (with warm + span + 2, a 4 s ramp let the
                        # first half of 100 sessions end up to 2 s before the window did)
                        ramp = min(4.0, 0.05 * n + 1.0)
                        plan = LivePlan(seconds=ramp + warm_s + span_s + 2.0, question_every_s=every,
                                        ramp_s=ramp)
                        r = measure(proc, port, n, procs, plan, warm_s, span_s)
                        d = r.pop("during")
                        per = (d["cores"] - base["cores"]) / n
                        live = d["sessions_by_worker"]   # at the end of the window (multi-worker)
                        held = (r["sessions_connected"] == n and not r["errors"]
                                and (not live or sum(live.values()) == n)
                                and (kind == "idle" or (r["answers"] > 0 and not r["answers_with_gaps"]
                                                        and (r["ttfa_p90_ms"] or 1e9) <= TTFA_P90_TARGET_MS))
                                and (d["lag_p99_ms"] is None or d["lag_p99_ms"] <= LAG_P99_TARGET_MS))
                        row = {"mode": mode, "workers": w, "sessions": n, "load": kind,
                               "server_cores": round(d["cores"], 3), "idle_server_cores": round(base["cores"], 3),
                               "cores_per_session": round(per, 4), "loop_lag_p99_ms": d["lag_p99_ms"],
                               "loop_lag_p99_ms_by_worker": d["lag_p99_ms_by_worker"],
                               "sessions_by_worker": d["sessions_by_worker"],
                               "held": held, **r}
                        rows.append(row)
                        say(f"  {n} {kind}: {per:.4f} cores/session (tree {d['cores']:.3f}), lag p99 "
                            f"{d['lag_p99_ms']} ms (by worker {d['lag_p99_ms_by_worker']}), sessions by worker "
                            f"{d['sessions_by_worker']}, answers {r['answers']} (gaps {r['answers_with_gaps']}), "
                            f"first audio p90 {r['ttfa_p90_ms']} ms, generator lag p99 "
                            f"{r['generator_send_lag_p99_ms']} ms, held {held}")
            finally:
                stop_server(proc)
    say(format_table(rows))
    return {"rows": rows, "skipped": skipped, "workers_flag": multi, "cpu_count": os.cpu_count(), "model": model}


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':8} {'workers':>7} {'sessions':>8} {'load':6} {'core/sess':>9} {'lag p99':>8} "
            f"{'answers':>7} {'gaps':>5} {'1st p50':>8} {'1st p90':>8} {'gen lag':>8} held")
    lines = [head]
    for r in rows:
        f = (lambda v: "-" if v is None else f"{v:.0f}")
        lines.append(f"{r['mode']:8} {r['workers']:>7} {r['sessions']:>8} {r['load']:6} "
                     f"{r['cores_per_session']:>9.4f} {f(r['loop_lag_p99_ms']):>8} {r['answers']:>7} "
                     f"{r['answers_with_gaps']:>5} {f(r['ttfa_p50_ms']):>8} {f(r['ttfa_p90_ms']):>8} "
                     f"{r['generator_send_lag_p99_ms']:>8.0f} {'yes' if r['held'] else 'NO'}")
    return "\n".join(lines)


def main_args(args) -> dict:
    ints = (lambda s: tuple(int(x) for x in s.split(",")))
    return run_gateway_bench(sessions=ints(args.sessions), modes=tuple(args.modes.split(",")),
                             workers=ints(args.workers), model=args.model, span_s=args.span, warm_s=args.warm,
                             procs=args.procs, question_every_s=args.question_every, serve_cmd=args.serve_cmd,
                             serve_args=tuple(a for a in (args.serve_args or []) if a != "--"))
