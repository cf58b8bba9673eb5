"""SpeechDetector on espeak-ng speech, silence and noise (real silero-vad model)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from omni2.streaming.listening.detector import Heard  # noqa: E402
from omni2.streaming.listening.vad import CHUNK, SpeechDetector  # noqa: E402
from speech import noise, requires_speech, silence, utterance  # noqa: E402


def feed(detector: SpeechDetector, audio: np.ndarray, step: int) -> list[Heard]:
    events = []
    for i in range(0, audio.size, step):
        events += detector.feed_input(audio[i : i + step])
    return events


@requires_speech
@pytest.mark.parametrize("voice,speed", [("en-us", 160), ("en-gb+f3", 200), ("en-us+m3", 130)])
def test_speech_gives_one_start_and_stop_at_the_right_places(voice, speed):
    audio, start, end = utterance("tell me more about the weather", voice=voice, speed=speed,
                                  lead_s=1.0, tail_s=1.2)
    vad = SpeechDetector(silence_ms=500, prefix_padding_ms=300)
    events = feed(vad, audio, step=700)  # an odd step: chunking must not depend on it
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"], events
    started, stopped = events
    # Onset within ~100 ms of the true start, minus the prefix padding.
    assert abs(started.sample - (start - 4800)) <= 1600 + CHUNK, (started, start)
    # Stop = end of speech + 500 ms silence, within the VAD's trailing decay.
    assert end + 8000 - CHUNK <= stopped.sample <= end + 8000 + 4800, (stopped, end)


@requires_speech
def test_push_granularity_does_not_change_events():
    audio, _, _ = utterance("what about the weather", lead_s=0.6)
    a = feed(SpeechDetector(), audio, step=160)
    b = feed(SpeechDetector(), audio, step=audio.size)
    assert a == b and len(a) == 2


def test_silence_and_noise_give_no_events():
    vad = SpeechDetector()
    assert feed(vad, silence(2.0), 480) == []
    for kind in ("white", "pink", "brown"):
        vad.reset()
        assert feed(vad, noise(3.0, kind=kind, level_db=-30, seed=1), 480) == [], kind
    assert vad.speech_prob_last < 0.5


@requires_speech
def test_reset_restarts_sample_indices_and_state():
    audio, _, _ = utterance("stop omni", lead_s=0.5, tail_s=1.0)
    vad = SpeechDetector()
    first = feed(vad, audio, 512)
    feed(vad, audio[: audio.size // 2], 512)  # leave it mid-something
    vad.reset()
    assert vad.samples_seen == 0 and not vad.in_speech
    assert feed(vad, audio, 512) == first


@requires_speech
def test_min_speech_ms_ignores_short_blips():
    audio, start, _ = utterance("stop", lead_s=0.5, tail_s=0.8)
    blip = np.zeros_like(audio)
    blip[start : start + 1200] = audio[start : start + 1200]  # 75 ms of speech
    assert feed(SpeechDetector(min_speech_ms=250), blip, 512) == []
    assert feed(SpeechDetector(min_speech_ms=32), audio, 512)[0].kind == "speech_started"


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="threshold"):
        SpeechDetector(threshold=1.5)


@requires_speech
def test_pause_events_mark_the_quiet_run_that_ends_the_turn():
    """pause_ms reports each quiet run that reaches it; speech coming back says so; the last
    pause belongs to the same quiet run as speech_stopped, a fixed distance before it."""
    first, _, _ = utterance("what is the weather", lead_s=0.5, tail_s=0.45)
    second, _, end = utterance("in paris today", lead_s=0.0, tail_s=1.2)
    audio = np.concatenate([first, second])
    events = feed(SpeechDetector(silence_ms=500, pause_ms=150), audio, 700)
    kinds = [e.kind for e in events]
    assert kinds == ["speech_started", "speech_paused", "speech_resumed", "speech_paused", "speech_stopped"], events
    paused, stopped = events[-2:]
    chunks = lambda ms: -(-ms * 16 // CHUNK) * CHUNK  # noqa: E731 - quiet rounded up to chunks
    assert stopped.sample - paused.sample == chunks(500) - chunks(150)
    assert first.size + end < paused.sample < stopped.sample
    # without pause_ms (or pause_ms >= silence_ms) the events are the plain ones
    plain = feed(SpeechDetector(silence_ms=500, pause_ms=500), audio, 700)
    assert [e.kind for e in plain] == ["speech_started", "speech_stopped"]
    assert plain[-1] == stopped



def test_detectors_share_one_network_however_many_are_made():
    """Issue 19's soak: every session loaded its own silero module (~7.5 MB of C heap, freed
    only by a full gc). Detectors keep only their stream's state; the network is the process's."""
    from omni2.streaming.listening import vad

    before = vad.networks_loaded()
    detectors = [SpeechDetector() for _ in range(50)]
    for d in detectors:
        d.feed_input(np.zeros(4 * CHUNK, dtype=np.float32))
    assert vad.networks_loaded() - before <= 1     # at most the first load, if none was made yet
    assert len({id(d.stream) for d in detectors}) == 50   # but no two share a recurrent state
