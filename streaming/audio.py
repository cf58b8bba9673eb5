"""Audio signal utilities: file decoding, wire codecs, and sample-rate conversion.

Everything here is numpy on float32 mono signals in [-1, 1]; nothing touches a tensor.

Wire formats (OpenAI Realtime API names, beta and GA spellings) accepted by
`parse_audio_format` / `decode_input_audio` / `encode_output_audio`:

=====================================================  ==============  ===========
name                                                   encoding        sample rate
=====================================================  ==============  ===========
"pcm16", "audio/pcm", {"type": "audio/pcm"}             PCM16 LE mono   24000
{"type": "audio/pcm", "rate": R}, "audio/pcm;rate=R"   PCM16 LE mono   R
"pcm16-16k"                                            PCM16 LE mono   16000
"g711_ulaw", "audio/pcmu", {"type": "audio/pcmu"}       G.711 mu-law    8000
"g711_alaw", "audio/pcma", {"type": "audio/pcma"}       G.711 A-law     8000
=====================================================  ==============  ===========

The Realtime API itself only documents rate 24000 for audio/pcm; other PCM rates
(8000..48000, multiples of 8, 10 or 25 Hz: see PCM_RATE_RULE) are an extension so that
clients can send 16 kHz microphone audio unresampled.

Resampling is a polyphase Kaiser-windowed-sinc filter: output sample n sits at input time
n * sr_in / sr_out, and is the dot product of the input around that time with the filter
phase for its fractional position. `Resampler` does the same in streaming form, so a
microphone stream resampled chunk by chunk gives the same samples as the whole recording.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Union

import numpy as np

MODEL_SAMPLE_RATE = 16_000  # Whisper input
# OpenAI Realtime pcm16, and the rate the model speaks at (its SNAC codec's, which model/
# defines as snac_layout.SAMPLE_RATE; tests/test_one_interface.py holds the two equal): the
# one definition for streaming/, server/ and clients/ (clients import this torch-free module).
REALTIME_SAMPLE_RATE = 24_000
G711_SAMPLE_RATE = 8_000


# ---- files ------------------------------------------------------------------------------

def load_audio_file(source: Union[str, Path, bytes, bytearray, memoryview]) -> tuple[np.ndarray, int]:
    """Decode a WAV/FLAC/OGG... file (path or bytes) to (float32 mono, sample_rate).

    Multi-channel audio is mixed to mono by averaging the channels.
    """
    import soundfile as sf

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("cannot decode audio: the data is empty")
        handle, name = io.BytesIO(bytes(source)), "audio bytes"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: audio file not found")
        handle, name = str(path), str(path)
    try:
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # LibsndfileError subclasses RuntimeError
        raise ValueError(f"cannot decode {name}: not a supported audio file ({exc})") from exc
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


# ---- PCM16 and G.711 codecs ---------------------------------------------------------------

def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _to_int16(x: np.ndarray) -> np.ndarray:
    # Round to nearest and clip: 1.0 maps to 32767 rather than wrapping to -32768.
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """Float samples (clipped to [-1, 1]) -> little-endian signed 16-bit PCM bytes."""
    return _to_int16(x).astype("<i2").tobytes()


def _mulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    # A-law's sign bit set means positive (the opposite of mu-law).
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


_MULAW_TO_INT16 = _mulaw_decode_table()
_ALAW_TO_INT16 = _alaw_decode_table()
_MULAW_BIAS = 0x21  # 14-bit domain (0x84 >> 2)
_MULAW_CLIP = 8159  # 14-bit domain


def _highest_bit(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) for positive ints (exact, unlike float log2 near powers of two)."""
    out = np.zeros(v.shape, dtype=np.int32)
    for shift in (8, 4, 2, 1):
        big = v >= (1 << shift)
        out = np.where(big, out + shift, out)
        v = np.where(big, v >> shift, v)
    return out


def mulaw_to_int16(data: bytes) -> np.ndarray:
    return _MULAW_TO_INT16[np.frombuffer(data, dtype=np.uint8)]


def alaw_to_int16(data: bytes) -> np.ndarray:
    return _ALAW_TO_INT16[np.frombuffer(data, dtype=np.uint8)]


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> float32 (int16 scale / 32768)."""
    return mulaw_to_int16(data).astype(np.float32) / np.float32(32768.0)


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> float32 (int16 scale / 32768)."""
    return alaw_to_int16(data).astype(np.float32) / np.float32(32768.0)


def int16_to_mulaw(s: np.ndarray) -> bytes:
    # G.711 quantizes mu-law on 14-bit samples: drop the 2 low bits first, as the ITU
    # reference does, so that codes agree with every other G.711 implementation.
    s = np.asarray(s, dtype=np.int32) >> 2
    sign = np.where(s < 0, 0x00, 0x80)
    # Full-scale input overflows the top segment: it takes the largest code.
    magnitude = np.minimum(np.minimum(np.abs(s), _MULAW_CLIP) + _MULAW_BIAS, 0x1FFF)
    exponent = np.maximum(_highest_bit(magnitude) - 5, 0)
    mantissa = (magnitude >> (exponent + 1)) & 0x0F
    return (((exponent << 4) | mantissa | sign) ^ 0x7F).astype(np.uint8).tobytes()


def int16_to_alaw(s: np.ndarray) -> bytes:
    s = np.asarray(s, dtype=np.int32)
    mask = np.where(s >= 0, 0xD5, 0x55)
    # One's complement for negatives keeps the quantizer symmetric: [-16, -1] -> -8 like [0, 15] -> 8.
    magnitude = np.minimum(np.where(s >= 0, s, ~s), 32767)
    exponent = np.where(magnitude < 256, 0, _highest_bit(np.maximum(magnitude, 1)) - 7)
    mantissa = np.where(exponent == 0, magnitude >> 4, magnitude >> (exponent + 3)) & 0x0F
    return (((exponent << 4) | mantissa) ^ mask).astype(np.uint8).tobytes()


def mulaw_encode(x: np.ndarray) -> bytes:
    """Float samples -> G.711 mu-law bytes."""
    return int16_to_mulaw(_to_int16(x))


def alaw_encode(x: np.ndarray) -> bytes:
    """Float samples -> G.711 A-law bytes."""
    return int16_to_alaw(_to_int16(x))


# ---- wire formats -------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioFormat:
    encoding: str  # "pcm16" | "g711_ulaw" | "g711_alaw"
    sample_rate: int


PCM_RATE_RANGE = (8_000, 48_000)
_NAMED_FORMATS = {
    "pcm16": AudioFormat("pcm16", REALTIME_SAMPLE_RATE),
    "audio/pcm": AudioFormat("pcm16", REALTIME_SAMPLE_RATE),
    "pcm16-16k": AudioFormat("pcm16", MODEL_SAMPLE_RATE),
    "g711_ulaw": AudioFormat("g711_ulaw", G711_SAMPLE_RATE),
    "audio/pcmu": AudioFormat("g711_ulaw", G711_SAMPLE_RATE),
    "g711_alaw": AudioFormat("g711_alaw", G711_SAMPLE_RATE),
    "audio/pcma": AudioFormat("g711_alaw", G711_SAMPLE_RATE),
}
_PCM_WITH_RATE = re.compile(r"audio/pcm\s*;\s*rate\s*=\s*(\d+)")
ACCEPTED_FORMATS = (
    "pcm16, pcm16-16k, g711_ulaw, g711_alaw, audio/pcm, audio/pcm;rate=R, audio/pcmu, audio/pcma, "
    '{"type": "audio/pcm", "rate": R}, {"type": "audio/pcmu"}, {"type": "audio/pcma"}'
)


# The PCM rates accepted are those the resampler reaches the model rate from with a filter
# table of at most max_phases phases: 16000 / gcd(rate, 16000) <= 2048, which is exactly the
# rates that are a multiple of 8, 10 or 25 Hz (every rate devices use). An odd rate such as
# 44101 Hz would need 16000 phases (25 MB of taps per rate): refused when the format is chosen.
PCM_RATE_RULE = (f"a whole number of Hz in {PCM_RATE_RANGE[0]}..{PCM_RATE_RANGE[1]} that is a multiple of "
                 "8, 10 or 25 (e.g. 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)")


def resampling_phases(sr_in: int, sr_out: int) -> int:
    """Filter phases a Resampler from sr_in to sr_out needs (the reduced upsampling factor)."""
    return sr_out // math.gcd(sr_in, sr_out)


def _pcm_rate(rate: object) -> int:
    if isinstance(rate, float) and math.isfinite(rate) and rate.is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, int):
        # (not int(rate): int(inf) raises OverflowError, int(nan) ValueError)
        raise ValueError(f"audio rate must be {PCM_RATE_RULE}; got {rate!r}")
    if not PCM_RATE_RANGE[0] <= rate <= PCM_RATE_RANGE[1]:
        raise ValueError(f"audio rate {rate} Hz is outside the supported {PCM_RATE_RANGE[0]}..{PCM_RATE_RANGE[1]} Hz")
    if resampling_phases(rate, MODEL_SAMPLE_RATE) > DEFAULT_QUALITY.max_phases:
        raise ValueError(f"audio rate {rate} Hz cannot be resampled to {MODEL_SAMPLE_RATE} Hz; "
                         f"accepted: {PCM_RATE_RULE}")
    return rate


def parse_audio_format(fmt: Union[str, Mapping, AudioFormat]) -> AudioFormat:
    """Normalize a Realtime API audio format (string or GA dict) to an AudioFormat."""
    if isinstance(fmt, AudioFormat):
        return fmt
    if isinstance(fmt, Mapping):
        kind = fmt.get("type")
        if not isinstance(kind, str) or kind.strip().lower() not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
            raise ValueError(f"unknown audio format type {kind!r}; accepted: {ACCEPTED_FORMATS}")
        base = _NAMED_FORMATS[kind.strip().lower()]
        rate = fmt.get("rate")
        if rate is None:
            return base
        if base.encoding == "pcm16":
            return AudioFormat("pcm16", _pcm_rate(rate))
        if rate != G711_SAMPLE_RATE:
            raise ValueError(f"{kind} is always {G711_SAMPLE_RATE} Hz, got rate {rate!r}")
        return base
    if isinstance(fmt, str):
        name = fmt.strip().lower()
        if name in _NAMED_FORMATS:
            return _NAMED_FORMATS[name]
        m = _PCM_WITH_RATE.fullmatch(name)
        if m:
            return AudioFormat("pcm16", _pcm_rate(int(m.group(1))))
    raise ValueError(f"unknown audio format {fmt!r}; accepted: {ACCEPTED_FORMATS}")


def decode_input_audio(data: bytes, fmt: Union[str, Mapping, AudioFormat]) -> tuple[np.ndarray, int]:
    """Wire bytes in `fmt` -> (float32 mono, sample_rate)."""
    f = parse_audio_format(fmt)
    if f.encoding == "pcm16":
        if len(data) % 2:
            raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)} (a sample was cut in half)")
        return pcm16_to_float(data), f.sample_rate
    if f.encoding == "g711_ulaw":
        return mulaw_decode(data), f.sample_rate
    return alaw_decode(data), f.sample_rate


def encode_output_audio(x: np.ndarray, fmt: Union[str, Mapping, AudioFormat]) -> bytes:
    """Float32 mono already at the format's sample rate -> wire bytes."""
    f = parse_audio_format(fmt)
    if f.encoding == "pcm16":
        return float_to_pcm16(x)
    if f.encoding == "g711_ulaw":
        return mulaw_encode(x)
    return alaw_encode(x)


# ---- resampling -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ResampleQuality:
    # Filter half-length in zero crossings of the sinc at the lower rate: longer = sharper
    # transition band, more compute. 32 gives a transition of ~16% of the lower Nyquist.
    zero_crossings: int = 32
    # Cutoff as a fraction of the lower Nyquist; with the transition above this puts the
    # stopband at ~the Nyquist itself, so nothing aliases back into the audible band.
    rolloff: float = 0.915
    # Kaiser beta 9.5 gives ~95 dB stopband attenuation.
    kaiser_beta: float = 9.5
    # Reduced ratio L/M with more phases than this (e.g. 44101 -> 16000) is refused rather
    # than building a huge filter table.
    max_phases: int = 2048
    # One-shot resampling works through the input in blocks of this many output samples.
    block_outputs: int = 8192


DEFAULT_QUALITY = ResampleQuality()


@lru_cache(maxsize=32)
def _filter_bank(up: int, down: int, quality: ResampleQuality) -> tuple[np.ndarray, int]:
    """Filter taps per phase: bank[p, j] weights input b - K + j for output time b + p/up."""
    cutoff = min(1.0, up / down) * quality.rolloff  # in cycles per input sample x 2 (Nyquist = 1)
    half_width = quality.zero_crossings / cutoff  # in input samples
    k = int(math.ceil(half_width)) + 1
    offsets = np.arange(-k, k + 1, dtype=np.float64)
    dist = np.arange(up, dtype=np.float64)[:, None] / up - offsets[None, :]
    window = np.where(
        np.abs(dist) <= half_width,
        np.i0(quality.kaiser_beta * np.sqrt(np.clip(1.0 - (dist / half_width) ** 2, 0.0, 1.0))) / np.i0(quality.kaiser_beta),
        0.0,
    )
    bank = cutoff * np.sinc(cutoff * dist) * window
    # Exact unit DC gain for every phase: no ripple at the phase period on constant input.
    bank /= bank.sum(axis=1, keepdims=True)
    bank.setflags(write=False)
    return bank, k


def soxr_available() -> bool:
    try:
        import soxr  # noqa: F401
    except ImportError:
        return False
    return True


class Resampler:
    """Streaming sample-rate converter: `process` chunks, then `flush` at the end.

    The concatenated outputs equal `resample(whole_input)`. Output lags input by about
    half the filter length (~2 ms for 24 kHz -> 16 kHz) until `flush` pads the end with
    silence. After `flush` the resampler is reset and can start a new stream.

    backend "soxr" (the default when the soxr package is installed) runs libsoxr's
    high-quality converter, ~40x cheaper than "sinc", the windowed-sinc polyphase filter
    below (kept as the fallback and for its tests); both meet the same response tests
    (tests/test_audio.py). Rates are checked the same way for both.
    """

    def __new__(cls, sr_in: int, sr_out: int, quality: ResampleQuality = DEFAULT_QUALITY,
                backend: str = "auto"):
        if cls is Resampler and backend in ("auto", "soxr") and quality == DEFAULT_QUALITY:
            if backend == "soxr" or soxr_available():
                return super().__new__(SoxrResampler)
        return super().__new__(cls)

    def __init__(self, sr_in: int, sr_out: int, quality: ResampleQuality = DEFAULT_QUALITY,
                 backend: str = "auto"):
        self._check_rates(sr_in, sr_out, quality)
        self._bank, self._k = (None, 0) if self.up == self.down else _filter_bank(self.up, self.down, quality)
        self.reset()

    def _check_rates(self, sr_in: int, sr_out: int, quality: ResampleQuality) -> None:
        if int(sr_in) != sr_in or int(sr_out) != sr_out or sr_in <= 0 or sr_out <= 0:
            raise ValueError(f"sample rates must be positive integers, got {sr_in} -> {sr_out}")
        self.sr_in, self.sr_out = int(sr_in), int(sr_out)
        self.up = resampling_phases(self.sr_in, self.sr_out)
        self.down = self.sr_in * self.up // self.sr_out
        if self.up > quality.max_phases:
            raise ValueError(
                f"resampling {sr_in} -> {sr_out} Hz needs {self.up} filter phases (limit {quality.max_phases})"
            )
        self.quality = quality

    def reset(self) -> None:
        self._buf = np.zeros(self._k, dtype=np.float64)  # history; zeros stand for t < 0
        self._buf_start = -self._k  # absolute input index of _buf[0]
        self._n_in = 0  # input samples seen
        self._n_out = 0  # output samples produced

    def _produce(self, n_end: int) -> np.ndarray:
        """Outputs self._n_out .. n_end-1 (their windows must lie inside the buffer)."""
        if n_end <= self._n_out:
            return np.zeros(0, dtype=np.float32)
        up, down, k = self.up, self.down, self._k
        pieces = []
        width = 2 * k + 1
        taps = np.arange(width)
        for start in range(self._n_out, n_end, self.quality.block_outputs):
            n = np.arange(start, min(n_end, start + self.quality.block_outputs), dtype=np.int64)
            pos = n * down
            base, phase = pos // up, pos % up
            first = base - k - self._buf_start
            windows = self._buf[first[:, None] + taps[None, :]]
            pieces.append(np.einsum("ij,ij->i", windows, self._bank[phase]))
        self._n_out = n_end
        # Keep only the history the next output still needs.
        keep_from = (self._n_out * down) // up - k - self._buf_start
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._buf_start += keep_from
        return np.concatenate(pieces).astype(np.float32)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        x = np.asarray(chunk, dtype=np.float64).reshape(-1)
        if self.up == self.down:
            self._n_in += len(x)
            return x.astype(np.float32)
        self._buf = np.concatenate([self._buf, x])
        self._n_in += len(x)
        last = self._n_in - 1
        # Output n is ready once input index floor(n*down/up) + k has arrived.
        ready_before = ((last - self._k + 1) * self.up + self.down - 1) // self.down
        return self._produce(max(ready_before, self._n_out))

    def flush(self) -> np.ndarray:
        """Emit the tail (input beyond the end counts as silence) and reset."""
        if self.up == self.down:
            self.reset()
            return np.zeros(0, dtype=np.float32)
        total = -(-self._n_in * self.up // self.down)  # ceil: outputs at times < n_in
        self._buf = np.concatenate([self._buf, np.zeros(self._k + 1)])
        out = self._produce(total)
        self.reset()
        return out


class SoxrResampler(Resampler):
    """Resampler on libsoxr (python-soxr's ResampleStream, quality HQ)."""

    def __init__(self, sr_in: int, sr_out: int, quality: ResampleQuality = DEFAULT_QUALITY,
                 backend: str = "soxr"):
        self._check_rates(sr_in, sr_out, quality)  # the same rates as the sinc filter takes
        self.reset()

    def reset(self) -> None:
        import soxr

        self._n_in = 0
        self._stream = None if self.sr_in == self.sr_out else soxr.ResampleStream(
            self.sr_in, self.sr_out, 1, dtype="float32", quality="HQ")

    def process(self, chunk: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(chunk, dtype=np.float32).reshape(-1))
        self._n_in += x.size
        if self._stream is None:
            return x.copy()
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        out = (np.zeros(0, dtype=np.float32) if self._stream is None
               else self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self.reset()
        return out


def resample(x: np.ndarray, sr_in: int, sr_out: int, quality: ResampleQuality = DEFAULT_QUALITY,
             backend: str = "auto") -> np.ndarray:
    """One-shot resampling of a whole signal: ceil(len(x) * sr_out / sr_in) samples."""
    r = Resampler(sr_in, sr_out, quality, backend)
    head = r.process(x)
    return np.concatenate([head, r.flush()])
