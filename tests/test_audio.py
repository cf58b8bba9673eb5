"""Audio utilities: codecs, wire formats, file loading, resampler quality and streaming."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from omni2.streaming.audio import (
    AudioFormat,
    Resampler,
    soxr_available,
    alaw_decode,
    alaw_encode,
    alaw_to_int16,
    decode_input_audio,
    encode_output_audio,
    float_to_pcm16,
    int16_to_alaw,
    int16_to_mulaw,
    load_audio_file,
    mulaw_decode,
    mulaw_encode,
    mulaw_to_int16,
    parse_audio_format,
    pcm16_to_float,
    resample,
    resampling_phases,
)

ALL_CODES = bytes(range(256))


def tone(freq: float, sr: int, seconds: float = 1.0, amp: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def rms_db(x: np.ndarray, ref_amp: float = 1.0) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) / (ref_amp / np.sqrt(2)))


def interior(x: np.ndarray) -> np.ndarray:
    cut = len(x) // 10
    return x[cut:-cut]


# ---- PCM16 ----------------------------------------------------------------------------------

def test_pcm16_round_trip_and_layout():
    ints = np.array([0, 1, -1, 32767, -32768, 1234, -4321], dtype=np.int16)
    data = ints.astype("<i2").tobytes()
    assert data[:4] == b"\x00\x00\x01\x00"  # little-endian
    x = pcm16_to_float(data)
    assert x.dtype == np.float32
    assert float_to_pcm16(x) == data


def test_pcm16_clips_instead_of_wrapping():
    out = np.frombuffer(float_to_pcm16(np.array([2.0, 1.0, -1.0, -3.0])), dtype="<i2")
    assert out.tolist() == [32767, 32767, -32768, -32768]


def test_pcm16_odd_length_rejected():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")


# ---- G.711 ------------------------------------------------------------------------------------

def test_mulaw_known_values():
    assert mulaw_to_int16(b"\xff\x00\x80\x7f").tolist() == [0, -32124, 32124, 0]
    assert mulaw_decode(b"\x00")[0] * 32768 == -32124
    assert int16_to_mulaw(np.array([0, 32767, -32768, 100, -100])) == bytes([0xFF, 0x80, 0x00, 0xF2, 0x72])


def test_alaw_known_values():
    assert alaw_to_int16(b"\xd5\x55\xaa\x2a").tolist() == [8, -8, 32256, -32256]
    assert alaw_decode(b"\xd5")[0] * 32768 == 8
    assert int16_to_alaw(np.array([0, -1, 32767, -32768])) == bytes([0xD5, 0x55, 0xAA, 0x2A])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_g711_matches_stdlib_reference_for_every_sample():
    audioop = pytest.importorskip("audioop")  # stdlib until Python 3.13: an independent G.711
    every = np.arange(-32768, 32768, dtype=np.int16)
    pcm = every.astype("<i2").tobytes()
    assert int16_to_mulaw(every) == audioop.lin2ulaw(pcm, 2)
    assert int16_to_alaw(every) == audioop.lin2alaw(pcm, 2)
    assert mulaw_to_int16(ALL_CODES).astype("<i2").tobytes() == audioop.ulaw2lin(ALL_CODES, 2)
    assert alaw_to_int16(ALL_CODES).astype("<i2").tobytes() == audioop.alaw2lin(ALL_CODES, 2)


def test_g711_every_code_round_trips():
    mu = mulaw_to_int16(ALL_CODES)
    back = int16_to_mulaw(mu)
    # 0x7F is mu-law's "negative zero": it decodes to 0, which encodes as 0xFF.
    assert [b for b, c in zip(back, ALL_CODES) if b != c] == [0xFF]
    assert int16_to_alaw(alaw_to_int16(ALL_CODES)) == ALL_CODES
    assert mulaw_encode(mulaw_decode(ALL_CODES)) == back
    assert alaw_encode(alaw_decode(ALL_CODES)) == ALL_CODES


@pytest.mark.parametrize("encode,decode", [(mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)])
def test_g711_quantization_error_is_logarithmic(encode, decode):
    x = tone(440, 8000, 0.5, amp=0.5)
    y = decode(encode(x)).astype(np.float64)
    snr = 10 * np.log10(np.mean(x**2) / np.mean((x - y) ** 2))
    assert 30 < snr < 45  # G.711 gives ~38 dB on a loud tone
    quiet = tone(440, 8000, 0.5, amp=0.01)
    yq = decode(encode(quiet)).astype(np.float64)
    assert 10 * np.log10(np.mean(quiet**2) / np.mean((quiet - yq) ** 2)) > 25  # still fine when quiet


def test_g711_monotonic_decode_tables():
    # Within one sign, larger codes mean larger magnitudes (mu-law counts down, A-law is xor'd).
    mu = mulaw_to_int16(bytes(range(0x00, 0x80))).astype(int)
    assert np.all(np.diff(mu) > 0)
    pos = sorted(alaw_to_int16(bytes(range(0x80, 0x100))).tolist())
    assert len(set(pos)) == 128 and pos[0] == 8 and pos[-1] == 32256


# ---- wire formats -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fmt,expect",
    [
        ("pcm16", AudioFormat("pcm16", 24000)),
        ("audio/pcm", AudioFormat("pcm16", 24000)),
        ("pcm16-16k", AudioFormat("pcm16", 16000)),
        ("audio/pcm;rate=16000", AudioFormat("pcm16", 16000)),
        ("g711_ulaw", AudioFormat("g711_ulaw", 8000)),
        ("g711_alaw", AudioFormat("g711_alaw", 8000)),
        ({"type": "audio/pcm", "rate": 24000}, AudioFormat("pcm16", 24000)),
        ({"type": "audio/pcm", "rate": 16000}, AudioFormat("pcm16", 16000)),
        ({"type": "audio/pcm"}, AudioFormat("pcm16", 24000)),
        ({"type": "audio/pcmu"}, AudioFormat("g711_ulaw", 8000)),
        ({"type": "audio/pcma"}, AudioFormat("g711_alaw", 8000)),
    ],
)
def test_parse_audio_format(fmt, expect):
    assert parse_audio_format(fmt) == expect


@pytest.mark.parametrize(
    "fmt",
    ["mp3", "pcm32", "", {"type": "audio/mp3"}, {"rate": 24000}, {"type": "audio/pcm", "rate": 1000},
     {"type": "audio/pcm", "rate": "fast"}, {"type": "audio/pcmu", "rate": 16000}, "audio/pcm;rate=0", 42,
     # Not a number of Hz (int(inf) raises OverflowError: it must be a ValueError here too).
     {"type": "audio/pcm", "rate": float("inf")}, {"type": "audio/pcm", "rate": float("-inf")},
     {"type": "audio/pcm", "rate": float("nan")}, {"type": "audio/pcm", "rate": 16000.5},
     {"type": "audio/pcm", "rate": 10 ** 5000}, "audio/pcm;rate=" + "9" * 5000],
)
def test_parse_audio_format_rejects(fmt):
    with pytest.raises(ValueError):
        parse_audio_format(fmt)


@pytest.mark.parametrize("fmt", [{"type": "audio/pcm", "rate": 44101}, {"type": "audio/pcm", "rate": 8001},
                                 {"type": "audio/pcm", "rate": 47999}, "audio/pcm;rate=16001"])
def test_rates_the_resampler_cannot_take_are_refused_naming_what_is_accepted(fmt):
    with pytest.raises(ValueError, match="multiple of 8, 10 or 25"):
        parse_audio_format(fmt)


def test_every_accepted_pcm_rate_builds_a_resampler():
    # The rule the error message states is exactly what the resampler takes.
    ok = [r for r in range(8000, 48001) if r % 8 == 0 or r % 10 == 0 or r % 25 == 0]
    assert [r for r in range(8000, 48001) if resampling_phases(r, 16000) <= 2048] == ok
    for rate in (8000, 11025, 22050, 44100, 47975, 16000.0):
        assert parse_audio_format({"type": "audio/pcm", "rate": rate}).sample_rate == rate
    Resampler(47975, 16000)  # the largest table accepted: 640 phases


def test_decode_input_audio_formats():
    x = tone(300, 8000, 0.1, amp=0.3)
    pcm = float_to_pcm16(x)
    y, sr = decode_input_audio(pcm, "pcm16")
    assert sr == 24000 and np.array_equal(y, pcm16_to_float(pcm))
    assert decode_input_audio(pcm, {"type": "audio/pcm", "rate": 16000})[1] == 16000
    mu, sr = decode_input_audio(mulaw_encode(x), {"type": "audio/pcmu"})
    assert sr == 8000 and np.abs(mu - x).max() < 0.02
    al, sr = decode_input_audio(encode_output_audio(x, "g711_alaw"), "audio/pcma")
    assert sr == 8000 and np.abs(al - x).max() < 0.02
    with pytest.raises(ValueError, match="even number of bytes"):
        decode_input_audio(pcm[:-1], "pcm16")


# ---- files -------------------------------------------------------------------------------------

def test_load_audio_file_mixes_stereo(tmp_path):
    left, right = tone(440, 22050, 0.2, 0.5), tone(880, 22050, 0.2, 0.25)
    path = tmp_path / "s.wav"
    sf.write(path, np.stack([left, right], axis=1), 22050, subtype="FLOAT")
    x, sr = load_audio_file(path)
    assert sr == 22050 and x.dtype == np.float32 and x.ndim == 1
    assert np.allclose(x, (left + right) / 2, atol=1e-6)
    buf = io.BytesIO()
    sf.write(buf, left, 16000, format="WAV", subtype="PCM_16")
    y, sr = load_audio_file(buf.getvalue())
    assert sr == 16000 and np.abs(y - left).max() < 1e-4


@pytest.mark.parametrize("data", [b"", b"this is not audio at all" * 10, b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_load_audio_file_rejects_garbage(data):
    with pytest.raises(ValueError, match="cannot decode"):
        load_audio_file(data)


def test_load_audio_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_audio_file(tmp_path / "nope.wav")


# ---- resampling --------------------------------------------------------------------------------

RATE_PAIRS = [(24000, 16000), (8000, 16000), (44100, 16000), (48000, 16000), (16000, 24000), (22050, 16000)]


# Every response test runs on both backends: libsoxr (the default when installed) and the
# windowed-sinc filter (the fallback).
BACKENDS = ["sinc", pytest.param("soxr", marks=pytest.mark.skipif(not soxr_available(), reason="soxr not installed"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """resample()/Resampler() in this test use the given backend."""
    import omni2.streaming.audio as audio

    if request.param == "sinc":
        monkeypatch.setattr(audio, "soxr_available", lambda: False)
    return request.param


def test_default_backend_is_soxr_when_installed():
    from omni2.streaming.audio import SoxrResampler

    assert isinstance(Resampler(24000, 16000), SoxrResampler) == soxr_available()
    assert not isinstance(Resampler(24000, 16000, backend="sinc"), SoxrResampler)


@pytest.mark.parametrize("sr_in,sr_out", RATE_PAIRS)
def test_sine_keeps_frequency_and_amplitude(sr_in, sr_out, backend):
    y = resample(tone(1000, sr_in, 1.0, amp=0.8), sr_in, sr_out)
    assert len(y) == sr_out
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.argmax(spectrum) == 1000  # 1 s of output -> 1 Hz bins
    ideal = tone(1000, sr_out, 1.0, amp=0.8)
    assert np.abs(interior(y) - interior(ideal)).max() < 1e-4  # also no delay


@pytest.mark.parametrize("sr_in,sr_out,freq", [(24000, 16000, 10000), (24000, 16000, 8500), (48000, 16000, 12000),
                                               (44100, 16000, 9000)])
def test_aliasing_attenuated(sr_in, sr_out, freq, backend):
    y = resample(tone(freq, sr_in), sr_in, sr_out)
    assert rms_db(interior(y)) < -60


def test_upsampling_images_attenuated(backend):
    # A 3 kHz tone at 8 kHz has its first image at 5 kHz once upsampled to 16 kHz.
    y = interior(resample(tone(3000, 8000), 8000, 16000))
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    image = spectrum[np.abs(freqs - 5000) < 50].max()
    assert 20 * np.log10(image / spectrum.max()) < -60


def test_passband_flat_for_speech(backend):
    for f in (100, 1000, 4000, 6000):
        assert abs(rms_db(interior(resample(tone(f, 24000), 24000, 16000)))) < 0.05


@pytest.mark.parametrize("sr_in,sr_out", RATE_PAIRS + [(16000, 16000)])
def test_streaming_equals_one_shot(sr_in, sr_out, backend):
    rng = np.random.default_rng(sr_in + sr_out)
    x = rng.standard_normal(sr_in // 2).astype(np.float32)
    one_shot = resample(x, sr_in, sr_out)
    assert len(one_shot) == -(-len(x) * sr_out // sr_in)
    for sizes in ([1] * 300 + [10**6], [7, 1, 480, 13, 2000], [len(x)]):
        r = Resampler(sr_in, sr_out)
        parts, i, k = [], 0, 0
        while i < len(x):
            n = sizes[k % len(sizes)]
            parts.append(r.process(x[i:i + n]))
            i, k = i + n, k + 1
        parts.append(r.flush())
        streamed = np.concatenate(parts)
        assert streamed.dtype == np.float32
        assert len(streamed) == len(one_shot)
        assert np.abs(streamed - one_shot).max() <= 1e-6


def test_resampler_reusable_after_flush_and_handles_empty(backend):
    r = Resampler(24000, 16000)
    assert len(r.process(np.zeros(0))) == 0
    x = tone(440, 24000, 0.1)
    first = np.concatenate([r.process(x), r.flush()])
    second = np.concatenate([r.process(x), r.flush()])
    assert np.array_equal(first, second)
    assert len(resample(np.zeros(0), 24000, 16000)) == 0


def test_resampler_rejects_bad_rates(backend):
    with pytest.raises(ValueError):
        Resampler(0, 16000)
    with pytest.raises(ValueError, match="filter phases"):
        Resampler(44101, 16000)
