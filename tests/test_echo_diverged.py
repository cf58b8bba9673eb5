"""A diverged echo filter is restarted instead of adding its estimate to the microphone.

On the tune split of `bench interrupt` (issue 18, echo with noise) a filter trained on the
catch-up audio put out an "echo estimate" 30-50 dB louder than the microphone for seconds,
and the recognizer read the assistant's words over the user's command. A filter that makes
every block louder than the microphone for EchoConfig.diverged_ms is reset to zero.
"""
from __future__ import annotations

import numpy as np

from omni2.streaming.listening.echo import EchoCanceller, EchoConfig

ROOM = np.array([0.6, 0.0, 0.25, -0.1, 0.05], dtype=np.float32)
DELAY = 1900
SR = 16000


def feed(ec: EchoCanceller, mic: np.ndarray, start: int, end: int, packet: int = 320) -> np.ndarray:
    return np.concatenate([ec.process(mic[i : i + packet]) for i in range(start, end, packet)])


def setup():
    rng = np.random.default_rng(3)
    answer = (rng.standard_normal(SR * 6) * 0.05).astype(np.float32)
    total = answer.size + SR + DELAY
    ref = np.zeros(total, np.float32)
    ref[SR // 2 : SR // 2 + answer.size] = answer
    mic = (rng.standard_normal(total) * 1e-4).astype(np.float32)
    mic[DELAY:] += np.convolve(ref, ROOM)[: total - DELAY]
    ec = EchoCanceller(EchoConfig())
    ec.add_reference(answer, SR // 2)
    return ec, mic


def power_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-20))


def test_a_diverged_filter_restarts_and_converges_again():
    ec, mic = setup()
    t = 2 * SR
    out = feed(ec, mic, 0, t)
    assert ec.delay is not None and ec.divergences == 0
    assert power_db(mic[t - SR // 2 : t]) - power_db(out[-SR // 2 :]) > 20   # converged
    ec._W_fg *= 1000.0   # as if a bad adaptation had blown the filter up
    ec._W_bg *= 1000.0
    after = feed(ec, mic, t, t + SR // 2)
    # Within diverged_ms (+ a block) it stops adding its estimate: the rest of the half
    # second is no louder than the microphone.
    settle = EchoConfig().diverged_ms * SR // 1000 + 2 * 256
    assert ec.divergences == 1
    assert power_db(after[settle:]) <= power_db(mic[t + settle : t + SR // 2]) + 1.0
    later = feed(ec, mic, t + SR // 2, t + 3 * SR)
    assert power_db(mic[t + 2 * SR : t + 3 * SR]) - power_db(later[-SR:]) > 15   # cancelling again
    assert ec.divergences == 1


def test_a_converging_filter_is_not_restarted():
    ec, mic = setup()
    feed(ec, mic, 0, mic.size - mic.size % 320)
    assert ec.delay is not None and ec.divergences == 0
