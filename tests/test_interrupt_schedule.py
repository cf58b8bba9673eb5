"""When the command recognizer runs, and what one decode costs.

The "pauses" schedule decodes where a command can end (a pause starts) instead of every
200-400 ms while the user speaks ("hops", the schedule before); the mel features of a
window are computed only where the audio is, with the same values as the full input.
The schedule tests use the real VAD and a recording detector (no whisper), so they count
decodes, not time.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("silero_vad", reason="silero-vad is not installed (pip install silero-vad)")

from omni2.streaming.listening.duplex import SAMPLE_RATE, DuplexConfig, DuplexController  # noqa: E402
from omni2.streaming.listening.interrupt import (  # noqa: E402
    CommandConfig,
    PhraseMatch,
    PhraseMatcher,
    RecognizerConfig,
    RecognizerUnavailable,
    Transcript,
    WhisperRecognizer,
    Word,
)
from speech import requires_speech, utterance  # noqa: E402


class RecordingDetector:
    """Stands in for CommandDetector: hears nothing, remembers each decode's windows."""

    def __init__(self, config: CommandConfig = CommandConfig()):
        self.config = config
        self.matcher = PhraseMatcher(config.phrases, config.similarity)
        self.calls: list[tuple[int, bool]] = []   # (samples in the first window, urgent)

    def score_windows(self, windows, urgent=False):
        self.calls.append((windows[0].size, urgent))
        return [(Transcript("", (), 0.0), None, 0.0) for _ in windows]


def _answering(cfg: DuplexConfig, det, seconds: float) -> DuplexController:
    """A tracing controller with `det` as its recognizer, while `seconds` of an answer play."""
    ctl = DuplexController(cfg, detector=det)
    ctl._tracing = True
    ctl.reset()
    ctl.set_speaking(True)
    ctl.feed_output(np.zeros(int(24000 * seconds), np.float32))
    return ctl


def _listen(cfg: DuplexConfig, audio: np.ndarray):
    """Feed `audio` in 20 ms packets while an answer plays; the decode trace."""
    det = RecordingDetector(cfg.command)
    ctl = _answering(cfg, det, audio.size // SAMPLE_RATE + 2)
    for pos in range(0, audio.size, 320):
        ctl.feed_input(audio[pos : pos + 320])
    return ctl, det


@pytest.fixture(scope="module")
def long_utterance():
    # ~3 s of speech with word gaps: many pauses, and hops would run all through it.
    return utterance("please continue the story about the old castle in the mountains", voice="en-us",
                     speed=150, lead_s=0.5, tail_s=1.0)


@requires_speech
def test_pauses_schedule_decodes_at_pauses_not_while_speaking(long_utterance):
    audio, start, end = long_utterance
    budget = dict(max_decode_share=100.0, decode_bank_ms=1_000_000)  # decisions, not compute
    hops, _ = _listen(DuplexConfig(schedule="hops", speculate_ms=0, **budget), audio)
    pauses, det = _listen(DuplexConfig(speculate_ms=0, **budget), audio)
    hop_triggers = [t for _, _, _, t in hops.trace]
    assert "hop" in hop_triggers and hop_triggers.count("hop") >= 5, hop_triggers
    triggers = [t for _, _, _, t in pauses.trace]
    assert triggers and set(triggers) <= {"pause", "check"}, triggers
    assert pauses.decodes < hops.decodes / 2, (pauses.decodes, hops.decodes)
    # Every decode is urgent (a decision waits on it), and the end of speech gets one soon.
    assert all(urgent for _, urgent in det.calls)
    # (espeak's audio ends in a quiet tail the VAD already calls a pause.)
    last = max(at for at, _, _, _ in pauses.trace)
    assert abs(last - end) <= 0.25 * SAMPLE_RATE, (last, end)


@requires_speech
def test_word_gaps_soon_after_an_idle_decode_are_not_decoded(long_utterance):
    audio, _, _ = long_utterance
    budget = dict(max_decode_share=100.0, decode_bank_ms=1_000_000)
    every, _ = _listen(DuplexConfig(pause_idle_ms=0, speculate_ms=0, **budget), audio)
    idle, _ = _listen(DuplexConfig(pause_idle_ms=300, speculate_ms=0, **budget), audio)
    assert idle.decodes < every.decodes
    ends = [at for at, _, _, _ in idle.trace]
    # The recording detector never hears part of a phrase: decodes are >= 300 ms apart.
    assert all(b - a >= 0.3 * SAMPLE_RATE for a, b in zip(ends, ends[1:])), ends
    gaps = [b - a for a, b in zip([at for at, _, _, _ in every.trace], [at for at, _, _, _ in every.trace][1:])]
    assert min(gaps) < 0.3 * SAMPLE_RATE, gaps   # without the rule some come closer


@requires_speech
def test_held_segments_may_keep_a_slow_hop(long_utterance):
    """With held_hop_ms, a segment held open past foreground_min_ms decodes that often."""
    audio, start, end = long_utterance
    budget = dict(max_decode_share=100.0, decode_bank_ms=1_000_000)
    plain, _ = _listen(DuplexConfig(**budget), audio)
    held, _ = _listen(DuplexConfig(held_hop_ms=300, pause_drop_db=60.0, pause_prob=0.01, **budget), audio)
    assert "hop" not in [t for _, _, _, t in plain.trace]
    hop_ends = [at for at, _, _, t in held.trace if t == "hop"]
    assert hop_ends, held.trace
    # Only once the segment has run foreground_min_ms (1.5 s) from its start.
    assert min(hop_ends) >= start + 1.5 * SAMPLE_RATE - 0.3 * SAMPLE_RATE


@requires_speech
def test_decodes_over_budget_are_counted(long_utterance):
    audio, _, _ = long_utterance
    ctl, _ = _listen(DuplexConfig(max_decode_share=1e-6, decode_bank_ms=0), audio)
    assert ctl.decodes == 0 and ctl.skipped > 0


class MatchingDetector(RecordingDetector):
    """Hears "Stop Omni." in every window (confident), to see when the match fires."""

    def score_windows(self, windows, urgent=False):
        self.calls.append((windows[0].size, urgent))
        heard = Transcript("Stop Omni.", (Word("Stop", 0.9), Word("Omni.", 0.9)), 0.0)
        return [(heard, PhraseMatch("stop omni", 1.0, 0, "Stop Omni."), 0.9) for _ in windows]


@requires_speech
@pytest.mark.parametrize("confirm_ms, chunks_later", [(32, 0), (64, 1)])
def test_a_match_at_a_pause_fires_after_confirm_pause_ms(confirm_ms, chunks_later):
    """With the default 32 ms a match found by the decode at a pause's first chunk fires on
    that chunk; 64 ms (the setting before) waits one 32 ms chunk more, behind the decode."""
    audio, _, _ = utterance("stop omni", voice="en-us", speed=150, lead_s=0.5, tail_s=1.0)
    cfg = DuplexConfig(confirm_pause_ms=confirm_ms, pause_idle_ms=0, speculate_ms=0)
    assert DuplexConfig().confirm_pause_ms == 32
    ctl = _answering(cfg, MatchingDetector(cfg.command), 4)
    stops = []
    for pos in range(0, audio.size, 320):
        stops += [e for e in ctl.feed_input(audio[pos : pos + 320]) if e.kind == "interrupt"]
        if stops:
            break
    assert stops and stops[0].reason == "command"
    first_pause_decode = next(at for at, _, _, trigger in ctl.trace if trigger == "pause")
    assert stops[0].sample == first_pause_decode + chunks_later * 512


class EndOfPhraseDetector(RecordingDetector):
    """Hears "Stop Omni." in windows that end within `span` samples after the phrase
    ends at `end` (whisper's reading once the last word is complete), nothing elsewhere."""

    def __init__(self, config, end: int, span: int = 1 << 30):
        super().__init__(config)
        self.end, self.span, self.ctl = end, span, None

    def score_windows(self, windows, urgent=False):
        now = self.ctl.vad.samples_seen   # the chunk being decided on ends here
        self.calls.append((now, urgent))
        if not 0 <= now - self.end <= self.span:
            return [(Transcript("", (), 0.0), None, 0.0) for _ in windows]
        heard = Transcript("Stop Omni.", (Word("Stop", 0.9), Word("Omni.", 0.9)), 0.0)
        return [(heard, PhraseMatch("stop omni", 1.0, 0, "Stop Omni."), 0.9) for _ in windows]


def _stops(cfg: DuplexConfig, audio: np.ndarray, end: int, span: int = 1 << 30, det=None):
    """The controller, its detector (default: EndOfPhraseDetector) and its stops on `audio`."""
    det = det or EndOfPhraseDetector(cfg.command, end, span)
    ctl = _answering(cfg, det, audio.size // SAMPLE_RATE + 2)
    det.ctl = ctl
    stops = []
    for pos in range(0, audio.size, 320):
        stops += [e for e in ctl.feed_input(audio[pos : pos + 320]) if e.kind == "interrupt"]
    return ctl, det, stops


@requires_speech
def test_a_fall_in_level_decodes_before_the_vad_pause_which_then_fires_at_once():
    """speculate_ms: the level falls ~35 ms after the last word, the VAD's probability
    100-220 ms after it. The decode starts at the fall; the stop still comes at the VAD's
    pause (same sample as without speculation) but that chunk runs no decode: the decode
    time no longer adds to the latency."""
    audio, _, end = utterance("stop omni", voice="en-us", speed=150, lead_s=0.5, tail_s=1.0)
    plain, _, plain_stops = _stops(DuplexConfig(speculate_ms=0, pause_idle_ms=0), audio, end)
    spec, det, spec_stops = _stops(DuplexConfig(speculate_ms=64, pause_idle_ms=0), audio, end)
    assert DuplexConfig().speculate_ms == 64
    assert len(plain_stops) == len(spec_stops) == 1
    stop = plain_stops[0].sample
    assert spec_stops[0].sample == stop
    # Without speculation the match is found by a decode on the stopping chunk itself.
    assert [at for at, _, conf, _ in plain.trace if conf > 0][0] == stop
    # With it, the decode that found it ran earlier, after the phrase ended, and the
    # stopping chunk ran none.
    found = [at for at, _, conf, _ in spec.trace if conf > 0]
    assert found and end <= found[0] < stop, (end, found, stop)
    assert stop not in [at for at, _, _, _ in spec.trace]


@requires_speech
def test_a_match_at_a_fall_does_not_fire_while_the_user_goes_on():
    """A speculative match waits for the VAD's pause: if the next decode (the user went
    on: "stop omni please continue") no longer ends with the phrase, nothing stops."""
    head, _, end = utterance("stop omni", voice="en-us", speed=150, lead_s=0.5, tail_s=0.0)
    rest, _, _ = utterance("please continue the story", voice="en-us", speed=150, lead_s=0.0, tail_s=1.0)
    gap = int(0.096 * SAMPLE_RATE)  # a breath: the level falls, the VAD does not let go
    audio = np.concatenate([head, np.zeros(gap, np.float32), rest])
    # whisper reads the phrase only until the next word shows
    ctl, det, stops = _stops(DuplexConfig(speculate_ms=64, pause_idle_ms=0), audio, end, span=gap + 1024)
    assert any(conf > 0 for _, _, conf, _ in ctl.trace), ctl.trace  # the fall's decode matched
    assert stops == [], stops


@requires_speech
def test_a_quieter_last_word_still_gets_a_decode_at_the_vad_pause():
    """ "STOP omni": the level falls after "stop" and "omni" never climbs back to within
    pause_drop_db of it, so one fall runs into the VAD's pause; the decodes inside it read
    "omni" unfinished, so the VAD's pause decodes again (without that: no stop)."""
    stop, _, _ = utterance("stop", voice="en-us", speed=150, lead_s=0.5, tail_s=0.0, level_db=-16)
    omni, _, _ = utterance("omni", voice="en-us", speed=150, lead_s=0.0, tail_s=1.0, level_db=-30)
    audio = np.concatenate([stop, omni])
    end = audio.size - SAMPLE_RATE
    ctl, _, stops = _stops(DuplexConfig(speculate_ms=64, pause_idle_ms=0), audio, end)
    assert len(stops) == 1 and stops[0].sample > end, (stops, ctl.trace)


class WaveringDetector(RecordingDetector):
    """Reads "Stop Omni." under the threshold (`confidence`) in the first `times` decodes
    after the phrase ends at `end`, and nothing in any other decode (whisper wavering
    on a command under echo)."""

    def __init__(self, config, end: int, confidence: float, times: int = 1 << 30):
        super().__init__(config)
        self.end, self.confidence, self.times, self.ctl = end, confidence, times, None

    def score_windows(self, windows, urgent=False):
        now = self.ctl.vad.samples_seen
        self.calls.append((now, urgent))
        if now < self.end or self.times <= 0:
            return [(Transcript("", (), 0.0), None, 0.0) for _ in windows]
        self.times -= 1
        heard = Transcript("Stop Omni.", (Word("Stop", 0.5), Word("Omni.", 0.5)), 0.0)
        return [(heard, PhraseMatch("stop omni", 1.0, 0, "Stop Omni."), self.confidence) for _ in windows]


@requires_speech
@pytest.mark.parametrize("repeat_count, confidence, times, stops", [
    (3, 0.4, 99, 1),    # read three decodes in a row under the threshold: a stop
    (0, 0.4, 99, 0),    # the rule off: under the threshold never stops
    (3, 0.4, 2, 0),     # read twice, then something else: no stop
    (3, 0.2, 99, 0),    # under repeat_threshold however often
])
def test_a_phrase_read_in_several_decodes_under_the_threshold_stops(repeat_count, confidence, times, stops):
    audio, _, end = utterance("stop omni", voice="en-us", speed=150, lead_s=0.5, tail_s=1.0)
    cfg = DuplexConfig(repeat_count=repeat_count, repeat_threshold=0.3, pause_idle_ms=0)
    assert confidence < cfg.command.threshold
    ctl, _, found = _stops(cfg, audio, end, det=WaveringDetector(cfg.command, end, confidence, times))
    assert len(found) == stops, ctl.trace
    if stops:
        matched = [at for at, _, conf, _ in ctl.trace if conf > 0]
        assert len(matched) >= 3 and found[0].sample >= matched[2] and found[0].confidence == confidence


def test_schedule_config_is_checked():
    with pytest.raises(ValueError, match="schedule"):
        DuplexConfig(schedule="sometimes")
    with pytest.raises(ValueError, match="held_hop_ms"):
        DuplexConfig(held_hop_ms=5)


def test_features_match_the_full_input():
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed")
    try:
        rec = WhisperRecognizer(RecognizerConfig(device="cpu"))
    except RecognizerUnavailable as exc:
        pytest.skip(str(exc))
    n = rec._frames * 160
    g = np.random.default_rng(1)
    for size in (0, 1, 400, 16000 + 77, 3 * 16000, n - 100, n, n + 5000):
        audio = (g.standard_normal(size) * 0.05).astype(np.float32)
        padded = np.zeros(n, np.float32)
        tail = audio[-n:] if size else audio
        padded[: tail.size] = tail
        full = rec._features(padded, padding=0)[:, : rec._frames]
        fast = rec.features(audio)
        assert fast.shape == full.shape == (rec.model.n_mels, rec._frames)
        np.testing.assert_allclose(fast, full, atol=1e-5, err_msg=f"{size} samples")


def test_the_recognizer_is_warm_once_built():
    """The mel's one-off setup (importing torch, the filterbank tensor: seconds) happens
    while the model loads, not inside the first decode, whose time a session's compute
    budget would be charged with."""
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed")
    try:
        rec = WhisperRecognizer(RecognizerConfig(device="cpu"))
    except RecognizerUnavailable as exc:
        pytest.skip(str(exc))
    assert rec._mel_filters is not None
    assert rec.warm_s > 0.0
    assert rec.stats.calls == 0  # warming is no model call: the stats count sessions' work


class ScriptedDetector(RecordingDetector):
    """Reads the decodes in turn from `script` ("phrase": "Stop Omni." 0.9, "weak": the same
    at 0.45, under the threshold; anything else: that text, no match), repeating its last
    entry once it runs out."""

    def __init__(self, config, script: list[str]):
        super().__init__(config)
        self.script = script

    def score_windows(self, windows, urgent=False):
        said = self.script[min(len(self.calls), len(self.script) - 1)]
        self.calls.append((windows[0].size, urgent))
        if said in ("phrase", "weak"):
            p = 0.9 if said == "phrase" else 0.45
            heard = Transcript("Stop Omni.", (Word("Stop", p), Word("Omni.", p)), 0.0)
            return [(heard, PhraseMatch("stop omni", 1.0, 0, "Stop Omni."), p) for _ in windows]
        return [(Transcript(said, (Word(said, 0.9),), 0.0), None, 0.0) for _ in windows]


def _chunks(levels_db: list[float], probs: list[float], cfg: DuplexConfig, script: list[str]):
    """Feed 32 ms chunks of noise at `levels_db` with the VAD's `probs` given (no VAD model:
    the levels and probabilities are exactly the test's) while an answer plays; (controller,
    detector, stops)."""
    from omni2.streaming.listening.vad import CHUNK

    det = ScriptedDetector(cfg.command, script)
    ctl = _answering(cfg, det, 4)
    rng = np.random.default_rng(0)
    audio = np.concatenate([rng.standard_normal(CHUNK).astype(np.float32) * 10 ** (db / 20) for db in levels_db])
    chunks = ctl.prepare_input(audio)
    events = ctl.consume_input(chunks, probs)
    return ctl, det, [e for e in events if e.kind == "interrupt"]


@pytest.mark.parametrize("script, stops", [
    (["phrase", "phrase", "Stop, I'm living", "phrase"], 1),   # one misreading: the pause decides
    (["phrase", "phrase", "Stop on my way", "Stop on my way."], 0),   # the user said more
])
def test_a_pending_stop_misread_at_the_words_end_is_decided_in_the_pause(script, stops):
    """Whisper may read the phrase while its last word is still being said (0.77, then 0.96
    in a check), and misread it in the next check, cut at the word's fading end ("Stop, I'm
    living"). That check dropped the stop, and as it fell inside the level's fall before the
    VAD's pause, no decode followed with silence after the words: a clean held-out command
    missed. Now the pause decodes again, and its reading decides."""
    loud, quiet, silent = -20.0, -45.0, -120.0
    #            lead        "stop om"   dip         "-ni..."    fading end  silence
    levels = [silent] * 5 + [loud] * 7 + [quiet] * 2 + [loud] * 7 + [quiet] * 4 + [silent] * 20
    probs = [0.01] * 5 + [0.99] * 20 + [0.01] * 20
    ctl, det, found = _chunks(levels, probs, DuplexConfig(), script)
    reads = [text for _, text, _, _ in ctl.trace]
    assert len(reads) >= 4 and reads[2] == script[2], ctl.trace   # the misreading came in a check
    assert len(found) == stops, ctl.trace
    if stops:
        assert found[0].sample > 25 * 512, found   # in the pause, after the misreading


def test_a_weak_reading_at_a_late_vad_pause_is_followed_up():
    """A fall that begins inside the command ("stop", then a quieter "omni" that stays 10 dB
    under it) can run 300 ms or more before the VAD's pause. Follow-up decodes were counted
    from the fall's start, so the VAD's pause got one decode (whisper under echo: "Stop
    Omni." 0.49, under the threshold) and none with more silence after the words. They are
    now counted from the VAD's pause."""
    loud, quiet, silent = -15.0, -30.0, -120.0
    levels = [silent] * 5 + [loud] * 7 + [quiet] * 11 + [silent] * 20
    probs = [0.01] * 5 + [0.99] * 18 + [0.01] * 20
    ctl, det, found = _chunks(levels, probs, DuplexConfig(), ["Stop on.", "weak", "phrase"])
    assert [r for _, r, _, _ in ctl.trace][:2] == ["Stop on.", "Stop Omni."], ctl.trace
    assert len(found) == 1 and found[0].confidence == 0.9, ctl.trace
