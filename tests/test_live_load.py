"""Live microphones (clients/live_load.py), `omni2 loadtest --live`, `omni2 bench gateway`,
the null engine behind `omni2 serve --model null`, the event-loop lag metric and the server's
cost as the load tools read it (clients/server_cost.py).

Short runs against real servers on loopback: a uvicorn thread with the fake (= null) engine,
and for the bench a real `omni2 serve --model null` child process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import running_server  # noqa: E402

from omni2.clients import live_load, server_cost
from omni2.clients.tools import gateway_bench  # noqa: E402
from omni2.clients.cli import build_parser  # noqa: E402
from omni2.clients.loadtest import check_args  # noqa: E402
from speech import requires_speech  # noqa: E402


def test_process_tree_cpu_counts_children():
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.6: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess,sys,time\np=subprocess.Popen([sys.executable,'-c',{burn!r}])\n"
                               "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while server_cost.process_tree_cpu(parent.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.2)
        own = sum(int(f) for f in open(f"/proc/{parent.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        assert server_cost.process_tree_cpu(parent.pid) >= 0.55        # the child's burn counts
        assert own / os.sysconf("SC_CLK_TCK") < 0.5                     # the parent itself is idle
    finally:
        for p in [int(c) for c in os.listdir("/proc") if c.isdigit()]:
            try:
                if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == parent.pid:
                    os.kill(p, 9)
            except OSError:
                pass
        parent.kill()


def test_loop_lag_quantile_from_bucket_counts():
    before = {0.001: 10, 0.01: 10, 0.05: 10, float("inf"): 10}
    after = {0.001: 110, 0.01: 200, 0.05: 209, float("inf"): 210}
    assert server_cost.lag_p99_ms(before, after) == 50.0          # 199 of 200 within 50 ms
    assert server_cost.lag_p99_ms(after, after) is None


def test_loop_lag_p99_is_each_workers_own(monkeypatch):
    """Scrapes land on either gateway; comparing one worker's counts with another's made
    p99s no worker had. Each worker's window is its own before/after, the worst is reported."""
    quick = {0.001: 0, 0.05: 0, 0.1: 0, float("inf"): 0}
    counts = {1: dict(quick), 2: dict(quick)}
    answers = iter([1, 1, 2, 1, 2, 2, 1])        # the kernel's picks, connection by connection

    def scrape(port):
        w = next(answers)
        return w, dict(counts[w]), {1: 3, 2: 5}
    monkeypatch.setattr(server_cost, "_scrape_lag", scrape)
    monkeypatch.setattr(server_cost, "process_tree_cpu", lambda pid: 0.0)
    monkeypatch.setattr(server_cost.time, "sleep", lambda s: s and counts.update(
        {1: {0.001: 200, 0.05: 200, 0.1: 200, float("inf"): 200},       # worker 1: all fast
         2: {0.001: 150, 0.05: 199, 0.1: 200, float("inf"): 200}}))     # worker 2: one at 100 ms
    d = server_cost.cpu_window(1, 0, 0.0, 1.0)
    assert d["lag_p99_ms_by_worker"] == {1: 1.0, 2: 50.0}
    assert d["lag_p99_ms"] == 50.0
    assert d["sessions_by_worker"] == {1: 3, 2: 5}


def test_workers_flag_detected_from_help(tmp_path):
    with_flag, without = tmp_path / "a.py", tmp_path / "b.py"
    with_flag.write_text("print('usage: serve [--workers N]')")
    without.write_text("print('usage: serve [--port P]')")
    assert gateway_bench.accepts_workers([sys.executable, str(with_flag)])
    assert not gateway_bench.accepts_workers([sys.executable, str(without)])


def test_loadtest_live_arguments():
    parse = (lambda argv: build_parser(only="loadtest").parse_args(argv))
    assert check_args(parse(["loadtest", "--sessions", "300"])) is not None              # one loop: 256
    assert check_args(parse(["loadtest", "--live", "5", "--procs", "2", "--sessions", "300"])) is None
    assert check_args(parse(["loadtest", "--live", "5", "--procs", "1", "--sessions", "300"])) is not None
    assert check_args(parse(["loadtest", "--live", "5", "--stop-share", "2"])) is not None
    # what only the turn-by-turn mode reads is refused with --live, not silently dropped
    for extra in (["--turns", "3"], ["--audio", "q.wav"], ["--fast"], ["--vad"], ["--duration-limit", "10"]):
        problem = check_args(parse(["loadtest", "--live", "5", *extra]))
        assert problem is not None and extra[0] in problem, extra
        assert check_args(parse(["loadtest", *extra])) is None, extra


@requires_speech
def test_live_sessions_ask_listen_and_are_charged_to_the_server(capsys):
    """Four live microphones over two load processes: questions cut by the server's VAD,
    answers with no gaps, and the server found by its port for CPU per session."""
    eng = FakeEngine(slots=8, answer_words=6, tick_s=0.05).start()
    try:
        with running_server(eng, max_sessions=8, max_connections_per_client=0) as srv:
            args = build_parser(only="loadtest").parse_args(
                ["loadtest", "--url", srv.ws, "--live", "9", "--sessions", "4", "--procs", "2",
                 "--question-every", "0.5"])
            from omni2.clients.loadtest import main

            rc = main(args)
            with urllib.request.urlopen(srv.http + "/metrics") as r:
                metrics = r.read().decode()
    finally:
        eng.stop()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "4 of 4 connected over 2 load processes" in out
    answers = int(out.split("answers (whole / stopped by user)")[1].split()[0])
    assert answers >= 4, out                                          # every session was answered
    assert "server CPU per session" in out and "cores" in out.split("server CPU per session")[1].split("\n")[0]
    assert "omni2_event_loop_lag_seconds_count" in metrics
    # the generator's own CPU is the run's (a few seconds of imports and espeak before it are not)
    gen_cpu, wall = (float(x) for x in out.split("load generator CPU")[1].split()[0:4:3])
    assert 0 < gen_cpu < 2 * wall, out
    assert float(out.split("answer audio received")[1].split()[0]) > 0, out
    assert "answer audio per wall second p10 / p50" in out, out


def test_connection_cap_is_counted_not_an_error():
    eng = FakeEngine(slots=8).start()
    try:
        with running_server(eng, max_sessions=8, max_connections_per_client=2) as srv:
            plan = live_load.LivePlan(seconds=1.5, question_every_s=None, ramp_s=0.2)
            s = live_load.run_live(srv.ws, 4, 1, plan)
    finally:
        eng.stop()
    assert s["sessions_connected"] == 2 and s["connection_capped"] == 2 and s["errors"] == 0, s


def test_null_engine_is_served_by_omni2_serve():
    from omni2.server.serve import check_model, load_engine
    from omni2.server.settings import ServerSettings
    from omni2.streaming.engine.messages import TextDelta, TurnDone, TurnRequest

    check_model("null")
    engine, info = load_engine(ServerSettings(model="null", max_sessions=2))
    try:
        assert info["model"] == "null"
        sid = engine.open_session()
        turn = engine.submit(TurnRequest(session_id=sid, text="hello"))
        events = list(turn.events(timeout=20))
    finally:
        engine.stop()
    assert isinstance(events[-1], TurnDone) and events[-1].reason == "completed"
    audio_s = sum(e.pcm.size for e in events if hasattr(e, "pcm")) / 24000
    assert audio_s >= 3.0                          # a NULL_ANSWER_S answer of tone
    assert sum(isinstance(e, TextDelta) for e in events) >= 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_gateway_runs_the_null_engine_server():
    result = gateway_bench.run_gateway_bench(sessions=(2,), modes=("vad",), workers=(1, 2), span_s=2.0,
                                             warm_s=1.0, procs=1, question_every_s=0.5, say=lambda *a: None)
    rows = result["rows"]
    assert result["workers_flag"]                  # omni2 serve --workers (server/workers)
    assert [(r["load"], r["sessions"], r["workers"]) for r in rows] == [
        ("idle", 2, 1), ("active", 2, 1), ("idle", 2, 2), ("active", 2, 2)]
    assert not result["skipped"]
    assert all(r["sessions_connected"] == 2 and r["errors"] == 0 for r in rows), rows
    assert all(r["answers"] >= 1 for r in rows if r["load"] == "active")
    assert all(r["answers"] == 0 for r in rows if r["load"] == "idle")
    assert all(r["server_cores"] > 0 for r in rows)
