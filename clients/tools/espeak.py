"""Speech and noise synthesis with espeak-ng + sox, for tests and the interrupt benchmark.

Nothing here runs in the serving path. It lives in the package (not only under tests/)
because `omni2 bench interrupt` generates its evaluation set at run time and must work
from an installed wheel.
"""
from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np

SAMPLE_RATE = 16000


class SynthUnavailable(RuntimeError):
    """espeak-ng or sox is not installed."""


def missing_tools() -> list[str]:
    """Names of the command-line tools synthesis needs that are not on PATH."""
    return [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]


def voices() -> list[str]:
    """espeak-ng voice names whose language is English (e.g. 'en-us', 'en-gb-x-rp')."""
    if missing_tools():
        return []
    out = subprocess.run(
        ["espeak-ng", "--voices=en"], capture_output=True, text=True, check=True
    ).stdout
    names = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            names.append(parts[1])
    return names


@functools.lru_cache(maxsize=512)
def _speak_cached(
    text: str, voice: str, speed: int, pitch: int, rate: int
) -> bytes:
    absent = missing_tools()
    if absent:
        raise SynthUnavailable(f"speech synthesis needs {', '.join(absent)} (apt-get install espeak-ng sox)")
    espeak = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
    )
    sox = subprocess.run(
        ["sox", "-t", "wav", "-", "-t", "raw", "-r", str(rate), "-e", "floating-point",
         "-b", "32", "-c", "1", "-"],
        input=espeak.stdout,
        capture_output=True,
        check=True,
    )
    return sox.stdout


def speak(
    text: str,
    voice: str = "en-us",
    speed: int = 160,
    pitch: int = 50,
    rate: int = SAMPLE_RATE,
    level_db: float | None = -20.0,
    trim: bool = True,
) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono at `rate` Hz.

    speed is words per minute, pitch 0-99. level_db sets the RMS level of the speech part
    in dBFS (None keeps espeak's level); trim drops espeak's leading/trailing silence so
    callers control the timing exactly.
    """
    audio = np.frombuffer(_speak_cached(text, voice, int(speed), int(pitch), int(rate)), dtype="<f4").copy()
    if trim:
        audio = trim_silence(audio)
    if level_db is not None:
        audio = set_level(audio, level_db)
    return audio


def trim_silence(audio: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Cut leading and trailing samples whose magnitude stays under `floor`."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    if loud.size == 0:
        return audio[:0]
    return audio[loud[0] : loud[-1] + 1]


def rms_db(audio: np.ndarray) -> float:
    """RMS level in dBFS of the samples louder than -60 dBFS (speech part only)."""
    active = audio[np.abs(audio) > 1e-3]
    if active.size == 0:
        return -120.0
    return float(20 * np.log10(np.sqrt(np.mean(active.astype(np.float64) ** 2)) + 1e-12))


def set_level(audio: np.ndarray, level_db: float) -> np.ndarray:
    """`audio` scaled so its active-part RMS is `level_db` dBFS."""
    current = rms_db(audio)
    if current <= -119:
        return audio.astype(np.float32)
    return (audio * 10 ** ((level_db - current) / 20)).astype(np.float32)


def silence(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def noise(
    seconds: float,
    kind: str = "white",
    level_db: float = -30.0,
    rate: int = SAMPLE_RATE,
    seed: int = 0,
) -> np.ndarray:
    """Noise clip: 'white', 'pink' (1/f, like fans and room tone) or 'brown' (rumble)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    white = rng.standard_normal(n)
    if kind == "white":
        out = white
    elif kind in ("pink", "brown"):
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, 1 / rate)
        freqs[0] = freqs[1] if n > 1 else 1.0
        spectrum /= np.sqrt(freqs) if kind == "pink" else freqs
        out = np.fft.irfft(spectrum, n)
    else:
        raise ValueError(f"unknown noise kind {kind!r} (white, pink, brown)")
    out = out / (np.sqrt(np.mean(out**2)) + 1e-12) * 10 ** (level_db / 20)
    return out.astype(np.float32)


def mix(base: np.ndarray, other: np.ndarray, offset: int = 0) -> np.ndarray:
    """`base` with `other` added from sample `offset`, extended if `other` runs past it."""
    end = offset + other.size
    out = np.zeros(max(base.size, end), dtype=np.float32)
    out[: base.size] = base
    out[offset:end] += other
    return out


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling through sox (tests and benchmark only)."""
    if src_rate == dst_rate:
        return audio.astype(np.float32)
    out = subprocess.run(
        ["sox", "-t", "raw", "-r", str(src_rate), "-e", "floating-point", "-b", "32", "-c", "1", "-",
         "-t", "raw", "-r", str(dst_rate), "-e", "floating-point", "-b", "32", "-c", "1", "-"],
        input=np.ascontiguousarray(audio, dtype="<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    return np.frombuffer(out.stdout, dtype="<f4").copy()
