"""`omni2 loadtest`'s progress and its playback figures: the jitter-buffer underrun count on
made-up arrival times, the progress bar and its plain-line stand-in, and a run against a
server whose (fake) engine speaks slower than real time, so every answer stalls a listener."""
from __future__ import annotations

import asyncio
import io

import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from fake_engine import FakeEngine  # noqa: E402
from server_harness import running_server  # noqa: E402

from omni2.clients import loadtest  # noqa: E402
from omni2.clients.cli import build_parser  # noqa: E402
from omni2.clients.loadtest import Progress, Report, TurnResult, count_underruns  # noqa: E402

RATE = 1000     # samples per second in the made-up arrivals (times and lengths exact in binary)


def parse(argv: list[str]):
    return build_parser(only=argv[0]).parse_args(argv)


def test_underruns_of_a_jitter_buffer():
    steady = [(0.125 * k, 125) for k in range(20)]           # 0.125 s every 0.125 s: just in time
    assert count_underruns(steady, 0.25, RATE) == 0
    assert count_underruns(steady, 0.0, RATE) == 0
    # A 0.5 s gap: a 0.25 s buffer runs dry once, refills, and plays on.
    gap = steady[:10] + [(t + 0.5, n) for t, n in steady[10:]]
    assert count_underruns(gap, 0.25, RATE) == 1
    assert count_underruns(gap, 0.75, RATE) == 0             # a deep enough buffer rides it out
    # Half real time: each refill to 0.25 s is played out before the next audio arrives.
    slow = [(0.25 * k, 125) for k in range(10)]
    assert count_underruns(slow, 0.25, RATE) == 3            # stalls before arrivals 3, 6 and 9
    assert count_underruns(slow, 0.0, RATE) == 9             # no buffer: a stall before each one
    # An answer shorter than the buffer never starts early, so it never stalls; nor does a
    # pause after the last audio (nothing more is needed).
    assert count_underruns([(0.0, 50), (1.0, 50)], 0.25, RATE) == 0
    assert count_underruns([(0.0, 500)], 0.25, RATE) == 0
    assert count_underruns([], 0.25, RATE) == 0


def _report(ok: int, failed: int, refusals: int = 0, skipped: int = 0) -> Report:
    report = Report(refused=refusals, turns_skipped=skipped)
    report.turns = [TurnResult(0, i, "completed", 0.1, 1.0, 0.5) for i in range(ok)]
    report.turns += [TurnResult(1, i, "refused", None, 0.0, None, "no_input: x") for i in range(failed)]
    return report


def test_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(6, stream=out, every_s=3600)
    progress.show(_report(1, 0))                              # too soon for another line
    assert out.getvalue() == ""
    progress.close(_report(2, 1, refusals=1, skipped=3))
    assert out.getvalue() == "loadtest: 6/6 turns (2 ok, 1 failed, 1 refused) after 0 s\n"


def test_progress_bar_on_a_terminal():
    out = io.StringIO()
    progress = Progress(4, stream=out, bar=True)
    progress.show(_report(1, 0))
    progress.close(_report(3, 1))
    text = out.getvalue()
    assert "1/4" in text and "4/4" in text and "ok=3" in text and "failed=1" in text, text


@pytest.fixture()
def slow_server():
    """Audio at a quarter of real time: 10 ms of sound every 40 ms."""
    engine = FakeEngine(slots=2, tick_s=0.04, chunk_s=0.01, words_every=1, answer_words=6).start()
    try:
        with running_server(engine) as srv:
            yield srv
    finally:
        engine.stop()


def test_loadtest_counts_underruns_and_shows_progress(slow_server, capsys):
    args = parse(["loadtest", "--url", slow_server.ws, "--sessions", "2", "--fast", "--jitter-ms", "20"])
    assert loadtest.main(args) == 0
    printed = capsys.readouterr()
    table = dict(line.split("  ", 1) for line in printed.out.splitlines())
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert table["turns completed"] == "2", printed.out
    assert table["jitter buffer"].startswith("20 ms"), printed.out
    assert table["answers with underruns"] == "2 of 2", printed.out
    assert int(table["playback underruns"]) >= 2, printed.out
    assert table["time to first audio p95"].endswith(" ms") and table["real-time factor p95"] != "-"
    assert "loadtest: 2/2 turns (2 ok, 0 failed, 0 refused)" in printed.err, printed.err


def test_run_load_reports_zero_underruns_faster_than_real_time():
    engine = FakeEngine(slots=2, tick_s=0.01, chunk_s=0.5, answer_words=4).start()
    try:
        with running_server(engine) as srv:
            args = parse(["loadtest", "--url", srv.ws, "--sessions", "2", "--fast"])
            report = asyncio.run(loadtest.run_load(args, loadtest.default_question(), 24000))
    finally:
        engine.stop()
    s = report.summary()
    assert s["turns_completed"] == 2 and s["underruns"] == 0 and s["answers_with_underruns"] == 0, s
    assert "rtf_p95" in s and s["ttfa_p95_ms"] is not None


def test_a_busy_engine_is_a_refusal_not_a_two_minute_wait():
    engine = FakeEngine(slots=1).start()   # one answer at a time; the second session is refused
    try:
        with running_server(engine, max_sessions=2) as srv:
            args = parse(["loadtest", "--url", srv.ws, "--sessions", "2", "--fast", "--turn-timeout", "60"])
            report = asyncio.run(loadtest.run_load(args, loadtest.default_question(), 24000))
    finally:
        engine.stop()
    s = report.summary()
    assert s["refusals"] == 1 and s["turns_completed"] == 1 and s["turns_failed"] == 0, (s, report.turns)
    assert report.wall_s < 30 and report.turns_skipped == 1
