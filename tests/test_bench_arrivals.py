"""`omni2 bench arrivals`: the open-loop run on the tiny model (a short one) and the rate search."""
from dataclasses import replace

import pytest

from omni2.clients.tools.bench_arrivals import ArrivalRun, arrival_run, past_held, search_rates


def _run(rate, held_up_to):
    ok = rate <= held_up_to
    return ArrivalRun(sessions=2, rate=rate, duration_s=1, turns=5, refused=0, barge_ins=0,
                      underruns=0 if ok else 3, answers_with_underruns=0 if ok else 1, step_p50_ms=1,
                      step_p99_ms=2, ttfa_p50_ms=100, ttfa_p90_ms=150, ttfa_p99_ms=190, mean_live=1)


def test_search_doubles_then_bisects_to_the_largest_rate_held():
    tried = []
    held, runs = search_rates(lambda r: tried.append(r) or _run(r, 3.1), start=1.0, bisections=3, out=lambda s: None)
    assert tried == [1.0, 2.0, 4.0, 3.0, 3.5, 3.25] and held == 3.0
    slow_tail = _run(1, 2).__class__(**{**_run(1, 2).__dict__, "ttfa_p99_ms": 250})
    assert not slow_tail.held and slow_tail.kept_deadlines                    # first audio judged apart
    rows = []
    held, _ = search_rates(lambda r: _run(r, 3.1).__class__(**{**_run(r, 3.1).__dict__, "ttfa_p99_ms": 250}),
                           start=1.0, bisections=1, out=rows.append, holds=lambda r: r.kept_deadlines)
    assert held == 3.0
    # each row's verdict is the rule the search used: the slow tail is listed, not a failure
    slow = "yes (first audio p99 > 2x p50)"
    assert [row.split("batch  ")[1] for row in rows] == [slow, slow, "no (underruns, first audio p99 > 2x p50)", slow]


def test_a_short_open_loop_run_on_the_tiny_model(tiny_model):
    r = arrival_run(tiny_model, sessions=2, rate=4.0, duration_s=1.5, answer_s=1.0, question_s=0.5)
    assert r.turns + r.refused >= 1 and r.turns >= 1
    assert r.step_p50_ms > 0 and r.step_p99_ms >= r.step_p50_ms
    assert 0 < r.ttfa_p50_ms <= r.ttfa_p90_ms <= r.ttfa_p99_ms
    assert r.underruns >= 0 and r.mean_live >= 1
    assert r.others_cores >= 0 or r.others_cores != r.others_cores   # nan without /proc


def test_the_hold_rule_allows_one_percent_refused_and_reports_the_first_rate_past_it():
    ok = _run(1, 2)
    assert ok.held and ok.offered == 5
    many = replace(ok, turns=199, refused=1)                   # 0.5% of 200 offered: still held
    assert many.held
    assert not replace(ok, turns=99, refused=2).held           # 2% refused
    assert not replace(ok, turns=4, refused=1).kept_deadlines  # one of 5
    runs = [_run(r, 3.1) for r in (1.0, 2.0, 4.0, 3.0)]
    assert past_held(runs, 3.0).rate == 4.0 and past_held(runs, 4.0) is None


def test_a_probe_runs_until_its_minimum_of_turns(tiny_model):
    r = arrival_run(tiny_model, sessions=2, rate=8.0, duration_s=0.1, answer_s=0.5, question_s=0.3, min_turns=6)
    assert r.offered == 6 and r.duration_s > 0.1                   # 0.1 s would have offered ~1


def test_each_engine_warms_up_on_answers_as_long_as_the_measured_ones(tiny_model, monkeypatch):
    from omni2.streaming.engine.engine import Engine

    seen = []
    warmup = Engine.warmup
    monkeypatch.setattr(Engine, "warmup", lambda self, seconds, steps: seen.append((seconds, steps))
                        or warmup(self, seconds, steps))
    arrival_run(tiny_model, sessions=2, rate=4.0, duration_s=0.3, answer_s=2.0, question_s=0.5)
    assert seen == [(0.5, 23 + 7)]        # 2 s of frames (23) + the 7-step delay: full-width SNAC windows


def test_others_load_is_the_machine_less_this_process(monkeypatch):
    import os

    from omni2.clients.tools import bench_arrivals

    samples = iter([(10.0, 1.0, 100.0), (13.0, 1.5, 102.0)])  # machine busy, own CPU, clock
    monkeypatch.setattr(bench_arrivals.OthersLoad, "_sample", staticmethod(lambda: next(samples)))
    assert bench_arrivals.OthersLoad().cores() == 1.25            # (3 - 0.5) cpu-s over 2 s
    if os.path.exists("/proc/stat"):
        monkeypatch.undo()
        assert bench_arrivals.OthersLoad().cores() >= 0


def test_the_arrivals_flag_is_refused_by_name(capsys):
    """`bench arrivals --arrivals poisson` was parsed and read nowhere: it is now an error that
    says arrivals are always Poisson, and the command without it still parses."""
    import argparse

    from omni2.clients.tools.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    for flag in (["--arrivals", "poisson"], ["--arrivals"], ["--arrivals=uniform"]):
        with pytest.raises(SystemExit):
            p.parse_args(["arrivals", *flag])
        assert "arrivals are always Poisson" in capsys.readouterr().err
    args = p.parse_args(["arrivals", "--rate", "3"])
    assert args.rate == 3 and not hasattr(args, "arrivals")


def test_the_stage_line_says_where_first_audio_went():
    from omni2.clients.tools.bench_arrivals import STAGES, stage_line

    def rec(ms, barge):
        return {**{k: ms / len(STAGES) for k in STAGES}, "ttfa": ms, "barge_in": barge}

    line = stage_line([rec(100, False), rec(200, False), rec(300, True), {**rec(0, True), "ttfa": None}])
    assert "encoded 40/60" in line and "ttfa 200/300" in line      # nearest rank over the three heard
    assert "barge-ins 1 of 3" in line and "first audio p50 300 vs 100 ms" in line   # (nearest rank of 100, 200)


def test_collections_are_timed_by_generation_while_entered():
    import gc

    from omni2.clients.tools.bench_arrivals import Collections

    with Collections() as seen:
        gc.collect(2)
    gc.collect(2)                                                   # after exit: not counted
    assert [g for g, _, _ in seen.pauses] == [2] and seen.pauses[0][2] > 0
    assert seen._note not in gc.callbacks


def test_the_wait_line_says_what_the_slowest_first_audios_met():
    """The slowest tenth's waits against the rest's: collections inside them and other turns
    starting meanwhile (waiting at submission, or submitted during the wait)."""
    from omni2.clients.tools.bench_arrivals import wait_line

    # 10 turns a second apart, each waiting 0.1 s; the slowest (0.5 s) met the next turn's submission
    recs = [{"ttfa": 100, "window": (float(i), i + 0.1), "starting": 0} for i in range(10)]
    recs[3] = {"ttfa": 500, "window": (3.0, 4.5), "starting": 1}
    pauses = [(2, 3.5, 0.3), (0, 7.05, 0.01), (1, 20.0, 0.002)]     # 0.3 s inside the slow wait, 0.01 s in turn 7's
    line = wait_line(recs + [{"ttfa": None, "window": None}], pauses)
    assert "gen0 1 (10 ms), gen1 1 (2 ms), gen2 1 (300 ms)" in line
    assert "slowest tenth 300.0 ms, the rest 1.1 ms" in line          # 10 ms in one of the other 9
    assert "starting meanwhile: slowest tenth 2.00, the rest 0.00" in line
    assert "first audio of the 9 that met none p50/p99 100/100 ms" in line    # (turn 4 has starting 0 here)
