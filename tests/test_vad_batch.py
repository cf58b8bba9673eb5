"""Batched silero-vad (one network call per step for many streams) == the module per stream.

Reference: the wheel's TorchScript module called chunk by chunk, one module per stream (how
every detector scored until the batch came). Several streams of espeak-ng speech, silence and
noise start at different offsets, so the batches mix streams in speech, in silence, and
streams that have run out of audio.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from omni2.streaming.listening.vad import (CHUNK, SAMPLE_RATE, SileroStream, SpeechDetector, load_silero,  # noqa: E402
                                 score_streams)
from speech import noise, requires_speech, silence, utterance  # noqa: E402


def reference_probs(audio: np.ndarray) -> np.ndarray:
    import torch

    model = load_silero()
    chunks = torch.from_numpy(audio[: audio.size // CHUNK * CHUNK].copy()).view(-1, CHUNK)
    with torch.inference_mode():
        return np.array([float(model(c, SAMPLE_RATE)) for c in chunks], dtype=np.float32)


def streams_audio() -> list[np.ndarray]:
    a, _, _ = utterance("tell me more about the weather", lead_s=0.5, tail_s=1.0)
    b, _, _ = utterance("stop omni", voice="en-gb+f3", speed=190, lead_s=1.3, tail_s=0.8)
    c = noise(2.5, level_db=-35.0, seed=3)
    d = np.concatenate([silence(0.7), a[: SAMPLE_RATE]])   # starts late, ends mid-word
    e = np.concatenate([noise(0.4, level_db=-45.0, seed=5), b])
    return [a, b, c, d, e]


BACKENDS = ["torchscript", pytest.param("onnxruntime", marks=pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed"))]


@requires_speech
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_scores_equal_the_module_per_stream(backend):
    audio = streams_audio()
    want = [reference_probs(x) for x in audio]
    streams = [SileroStream() for _ in audio]
    got = [[] for _ in audio]
    # Ticks of different sizes per stream: 100 ms for some, 64 ms or 200 ms for others.
    steps = [3, 2, 6, 3, 4]
    offsets = [0, 5, 11, 2, 7]            # chunks already scored before the others begin
    pos = [0] * len(audio)
    for tick in range(200):
        batch_streams, batch_chunks, owners = [], [], []
        for i, x in enumerate(audio):
            if tick < offsets[i] // steps[i]:
                continue
            chunks = x[pos[i] * CHUNK : (pos[i] + steps[i]) * CHUNK]
            k = chunks.size // CHUNK
            if k == 0:
                continue
            batch_streams.append(streams[i])
            batch_chunks.append(chunks[: k * CHUNK].reshape(k, CHUNK))
            owners.append(i)
            pos[i] += k
        if not owners:
            break
        for i, probs in zip(owners, score_streams(batch_streams, batch_chunks, backend)):
            got[i] += list(probs)
    for i in range(len(audio)):
        assert len(got[i]) == len(want[i])
        # A batch (and onnxruntime's kernels) sum in another order than the module: float32
        # rounding, carried by the recurrent state, moves a probability by ~1e-5.
        np.testing.assert_allclose(got[i], want[i], atol=1e-4)
        assert [p >= 0.5 for p in got[i]] == [p >= 0.5 for p in want[i]]
    assert max(want[0]) > 0.9 and max(want[2]) < 0.5   # speech is scored as speech, noise not


@requires_speech
def test_detector_events_same_alone_and_in_a_batch():
    audio = streams_audio()
    alone = []
    for x in audio:
        d = SpeechDetector(pause_ms=200)
        alone.append([e for i in range(0, x.size, 1600) for e in d.feed_input(x[i : i + 1600])])
    detectors = [SpeechDetector(pause_ms=200) for _ in audio]
    batched = [[] for _ in audio]
    for at in range(0, max(x.size for x in audio), 1600):
        work = [(d, d.prepare_input(x[at : at + 1600]), i) for i, (d, x) in enumerate(zip(detectors, audio))]
        work = [w for w in work if w[1].shape[0]]
        probs = score_streams([d.stream for d, _, _ in work], [c for _, c, _ in work])
        for (d, c, i), p in zip(work, probs):
            batched[i] += d.consume_input(c, p)
    assert batched == alone
    assert any(e.kind == "speech_started" for e in alone[0])
    assert not alone[2]


@requires_speech
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_few_streams_take_the_sequence_network_with_identical_scores(monkeypatch):
    """Up to SEQUENCE_STREAMS_MAX streams, each stream's chunks go through the wheel's unrolled
    export in one call: the probabilities and the state it leaves are the per-step calls' own,
    bit for bit, whichever way a stream's appends alternate between the two."""
    from omni2.streaming.listening import vad

    net = vad.shared_silero("onnxruntime")
    if net.sequence is None:
        pytest.skip("this silero-vad wheel has no sequence export")
    calls = {"sequence": 0}
    real = net.sequence
    monkeypatch.setattr(net, "sequence", lambda x, s: (calls.__setitem__("sequence", calls["sequence"] + 1),
                                                       real(x, s))[1])
    audio = streams_audio()[:2]
    sizes = [3, 1, 4, 2, 3, 6]

    def score(streams_max: int, flip: bool) -> list:
        streams, got, pos = [SileroStream() for _ in audio], [[] for _ in audio], [0, 0]
        for n in range(400):
            k = sizes[n % len(sizes)]
            monkeypatch.setattr(vad, "SEQUENCE_STREAMS_MAX", streams_max if not flip or n % 2 else 0)
            live = [i for i, x in enumerate(audio) if (pos[i] + k) * CHUNK <= x.size]
            if not live:
                break
            chunks = [audio[i][pos[i] * CHUNK:(pos[i] + k) * CHUNK].reshape(k, CHUNK) for i in live]
            for i, p in zip(live, vad.score_streams([streams[i] for i in live], chunks, "onnxruntime")):
                got[i] += list(p)
                pos[i] += k
        return got, streams

    steps, s_steps = score(0, False)          # one batched call per 32 ms step
    assert calls["sequence"] == 0
    seq, s_seq = score(3, False)              # one call per stream per append
    assert calls["sequence"] > 0
    mixed, _ = score(3, True)                 # the two alternate, append by append
    for i in range(len(audio)):
        assert np.array_equal(seq[i], steps[i]) and np.array_equal(mixed[i], steps[i])
        assert np.array_equal(s_seq[i].state, s_steps[i].state)
        assert np.array_equal(s_seq[i].context, s_steps[i].context)
    assert max(steps[0]) > 0.9
