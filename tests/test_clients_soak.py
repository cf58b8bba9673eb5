"""`omni2 bench soak` (clients/tools/soak.py): how it judges a run, and (slow) one short run."""
from __future__ import annotations

import pytest

from omni2.clients.tools.soak import MB, Sample, SoakRun, run_soak, summarize
from speech import requires_speech


def run_of(rss_mb_at) -> SoakRun:
    run = SoakRun(turns=100)
    run.samples = [Sample(t, int(rss_mb_at(t) * MB), t // 5, heap_in_use=200 * MB) for t in range(0, 600, 5)]
    return run


def test_a_sawtooth_that_does_not_rise_is_flat_and_a_rising_one_is_not():
    # The periodic trim makes RSS a sawtooth (1000..1400 MB every 10 s): judged per minute.
    flat = summarize(run_of(lambda t: 1000 + 400 * ((t % 10) / 10)), 600 * MB, 900 * MB, 1500 * MB, 16, 120)
    assert abs(flat["minute_mean_growth_pct"]) < 1 and abs(flat["slope_mb_per_min"]) < 5
    assert flat["steady_mb_per_session"] == pytest.approx((1100 - 600) / 16, rel=0.1)
    assert flat["heap_in_use_slope_mb_per_min"] == pytest.approx(0.0, abs=1e-6)
    rising = summarize(run_of(lambda t: 1000 + t), 600 * MB, 900 * MB, 1700 * MB, 16, 120)
    assert rising["minute_mean_growth_pct"] > 30 and rising["slope_mb_per_min"] == pytest.approx(60, rel=0.05)
    assert [m[0] for m in rising["rss_minutes_mb"]] == list(range(10))
    assert rising["rss_high_water_mb"] == 1700   # VmHWM above every sample: taken as is


def test_the_high_water_mark_is_never_below_a_sample():
    # VmHWM is read once at the end and the kernel updates it lazily: a sample may exceed it
    r = summarize(run_of(lambda t: 1000 + t), 600 * MB, 900 * MB, 1200 * MB, 16, 120)
    assert r["rss_high_water_mb"] == pytest.approx(1000 + 595) and r["rss_high_water_mb"] >= r["rss_end_mb"]


@pytest.mark.slow
@requires_speech
def test_a_short_soak_answers_and_reports():
    r = run_soak(sessions=2, minutes=0.4, warmup_min=0.1, sample_s=2.0, verbose=False)
    assert r["turns_answered"] >= 2 and r["errors"] == 0
    assert r["rss_ready_mb"] > 100 and r["rss_high_water_mb"] >= r["rss_end_mb"] > 0
    assert r["heap_in_use_end_mb"] is None or r["heap_in_use_end_mb"] > 0
    assert r["anon_minute_mean_growth_pct"] is not None  # RssAnon sampled too (Linux)
