"""The echo canceller skips its filter while nothing can be playing, with the same results.

A session listens far more than it is answered: between answers every 16 ms block used to
run the filter's FFTs on a silent reference. Skipping them must change nothing (same output
samples, same state, so the next answer is cancelled exactly as before) and must cost a small
fraction of the filter.
"""
from __future__ import annotations

import time

import numpy as np

from omni2.streaming.listening.echo import EchoCanceller, EchoConfig

ROOM = np.array([0.6, 0.0, 0.25, -0.1, 0.05], dtype=np.float32)
DELAY = 1900


def scenario(seconds_quiet: float = 3.0):
    """Two answers with quiet between; the mic hears their echo plus a faint room noise."""
    rng = np.random.default_rng(1)
    answer = (rng.standard_normal(16000 * 3) * 0.05).astype(np.float32)
    quiet = int(16000 * seconds_quiet)
    total = 2 * answer.size + 2 * quiet + DELAY + 16000
    ref = np.zeros(total, np.float32)
    ref[16000 : 16000 + answer.size] = answer
    second = 16000 + answer.size + quiet
    ref[second : second + answer.size] = answer[::-1]
    mic = (rng.standard_normal(total) * 1e-4).astype(np.float32)
    mic[DELAY:] += np.convolve(ref, ROOM)[: total - DELAY]
    return ref, mic, [(16000, answer), (second, answer[::-1])]


def run(config: EchoConfig, packet: int = 1600):
    ref, mic, answers = scenario()
    ec = EchoCanceller(config)
    out, pending = [], list(answers)
    for i in range(0, mic.size, packet):
        while pending and pending[0][0] <= i + packet:   # sent when its start is near, as a server does
            at, audio = pending.pop(0)
            ec.add_reference(audio, at)
        out.append(ec.process(mic[i : i + packet]))
    return ec, np.concatenate(out), mic


def test_skipping_quiet_blocks_changes_nothing():
    ec_skip, out_skip, mic = run(EchoConfig(skip_quiet=True))
    ec_full, out_full, _ = run(EchoConfig(skip_quiet=False))
    np.testing.assert_array_equal(out_skip, out_full)
    assert ec_skip.delay == ec_full.delay and ec_skip.delay is not None
    np.testing.assert_array_equal(ec_skip._W_fg, ec_full._W_fg)
    np.testing.assert_array_equal(ec_skip._power, ec_full._power)
    assert ec_skip.history == ec_full.history
    # ... and it still cancels while the answers are audible (ERLE over the second answer).
    second = slice(16000 + 48000 + 48000 + DELAY + 8000, 16000 + 48000 + 48000 + 48000)
    erle = 10 * np.log10(np.mean(mic[second] ** 2) / np.mean(out_skip[second] ** 2))
    assert erle > 20, erle


def test_quiet_blocks_are_cheap():
    ref, mic, answers = scenario()
    costs = {}
    for skip in (True, False):
        ec = EchoCanceller(EchoConfig(skip_quiet=skip))
        ec.add_reference(answers[0][1], answers[0][0])
        for i in range(0, 16000 * 5, 1600):        # the first answer and the quiet after it
            ec.process(mic[i : i + 1600])
        quiet = mic[16000 * 5 : 16000 * 6]             # one second of quiet, well after the answer
        t = time.perf_counter()
        for _ in range(3):
            for i in range(0, quiet.size, 1600):
                ec.process(quiet[i : i + 1600])
        costs[skip] = time.perf_counter() - t
        assert ec.delay is not None
    assert costs[True] < 0.5 * costs[False], costs
