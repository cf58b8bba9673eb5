"""The command recognizer under load: the windows of several sessions go into one model
call, give the same decisions as decoding each alone, and a controller's recognizer calls
are counted (not timed). The CUDA path runs where there is a GPU (marked gpu)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("faster_whisper", reason="faster-whisper is not installed")

from omni2.streaming.listening.interrupt import (  # noqa: E402
    CommandConfig,
    CommandDetector,
    RecognizerConfig,
    RecognizerUnavailable,
    WhisperRecognizer,
    loop_cut,
)
from speech import requires_speech, silence, speak  # noqa: E402

CLIPS = [("stop omni", "en-gb-x-rp+f3", 170), ("stop on my way", "en-us-nyc+m5", 190),
         ("tell me more", "en-us+Annie", 160), ("Stop Omni!", "en+Andy", 150)]


def test_whisper_restart_loops_are_dropped():
    cut = lambda text: " ".join(text.split()[: loop_cut(text.split())])  # noqa: E731
    assert cut("Please stop Omni. Please stop Omni") == "Please stop Omni."
    assert cut("Stop Omni. Stop Omni. Stop") == "Stop Omni."
    assert cut("Stop. Stop omni") == "Stop. Stop omni"       # new words: kept
    assert cut("Hello. Stop omni.") == "Hello. Stop omni."


def test_context_must_hold_the_window():
    with pytest.raises(ValueError, match="context_s"):
        CommandConfig(window_s=4.0, recognizer=RecognizerConfig(context_s=4.0))


def test_device_auto_follows_the_runtime():
    ct2 = pytest.importorskip("ctranslate2")
    device, compute = RecognizerConfig().resolved_device()
    assert device == ("cuda" if ct2.get_cuda_device_count() > 0 else "cpu")
    assert compute == ("int8_float16" if device == "cuda" else "int8")
    assert RecognizerConfig(device="cpu", compute_type="float32").resolved_device() == ("cpu", "float32")


def _recognizer(**kw) -> WhisperRecognizer:
    try:
        return WhisperRecognizer(RecognizerConfig(**kw))  # its own instance: its own counts
    except RecognizerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def recognizer():
    return _recognizer(device="cpu")


@pytest.fixture(scope="module")
def windows():
    return [np.concatenate([silence(0.2), speak(t, voice=v, speed=s, level_db=-22), silence(0.15)])
            for t, v, s in CLIPS]


def _held_first_call(recognizer, monkeypatch, waiting: int):
    """Make the first model call wait until `waiting` more requests are queued behind it,
    as when sessions hand in windows while a call runs; returns the batch sizes seen."""
    sizes: list[int] = []
    real = recognizer.generate

    def generate(windows, prompt, max_tokens):
        sizes.append(len(windows))
        if len(sizes) == 1:
            for _ in range(2000):
                with recognizer._cv:
                    if len(recognizer._queue) >= waiting:
                        break
                threading.Event().wait(0.005)
        return real(windows, prompt, max_tokens)

    monkeypatch.setattr(recognizer, "generate", generate)
    return sizes


@requires_speech
def test_sessions_windows_share_one_call_with_the_same_decisions(recognizer, windows, monkeypatch):
    det = CommandDetector(CommandConfig(), recognizer=recognizer)
    alone = [det.score(w) for w in windows]
    decisions = [r[1] is not None and r[2] >= det.config.threshold for r in alone]
    assert decisions[:3] == [True, False, False], [(r[0].text, r[2]) for r in alone]

    sizes = _held_first_call(recognizer, monkeypatch, waiting=len(windows))
    extra = [windows[0]]  # the session whose call is running
    together: list = [None] * len(windows)
    first = threading.Thread(target=lambda: extra.append(det.score(extra[0])))
    first.start()
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, det.score(windows[i])))
               for i in range(len(windows))]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(60)
    # One call for the first session, ONE call for every window handed in meanwhile.
    assert sizes == [1, len(windows)]
    for a, b in zip(alone, together):
        assert a[0].text == b[0].text
        assert (a[1] is not None and a[2] >= det.config.threshold) == (b[1] is not None and b[2] >= det.config.threshold)
        assert abs(a[2] - b[2]) < 0.02


@requires_speech
def test_urgent_windows_go_before_queued_hops(recognizer, windows, monkeypatch):
    """A pause decode (a stop decision waits on it) is not batched behind routine hops."""
    det = CommandDetector(CommandConfig(), recognizer=recognizer)
    _held_first_call(recognizer, monkeypatch, waiting=3)
    calls: list[list[bool]] = []
    real_run = recognizer._run
    monkeypatch.setattr(recognizer, "_run", lambda batch: (calls.append([r.urgent for r in batch]), real_run(batch))[1])
    first = threading.Thread(target=det.score_windows, args=([windows[1]],))
    first.start()
    while not calls:
        threading.Event().wait(0.002)
    later = [threading.Thread(target=det.score_windows, args=([w],), kwargs={"urgent": u})
             for w, u in ((windows[2], False), (windows[1], False), (windows[0], True))]
    for t in later:
        t.start()
    for t in [first, *later]:
        t.join(60)
    assert calls == [[False], [True], [False, False]]


@requires_speech
def test_concurrent_controllers_merge_their_decodes(windows, monkeypatch):
    """Four sessions hearing speech at once: recognizer calls grow with ticks, not sessions."""
    pytest.importorskip("silero_vad", reason="silero-vad is not installed")
    from omni2.streaming.listening.duplex import DuplexConfig, DuplexController

    rec = _recognizer(device="cpu")
    n = 4
    # Compute budget out of the way: every session decodes at the same ticks (every pause,
    # for more of them).
    cfg = DuplexConfig(max_decode_share=100.0, decode_bank_ms=1_000_000, hop_reserve_ms=0, pause_idle_ms=0)
    ctls = [DuplexController(cfg, detector=CommandDetector(cfg.command, recognizer=rec)) for _ in range(n)]
    mic = np.concatenate([silence(0.3), speak("tell me more about it", voice="en-us", level_db=-22),
                          silence(0.6)])
    out = speak("sure, the weather today is sunny", voice="en-us+f5", rate=24000, level_db=-30)
    real_run = rec._run
    sizes: list[int] = []
    inside = [0]  # sessions inside feed_input
    lock = threading.Lock()

    def run(batch):  # a call starts once every session of the tick has handed in its window or returned
        for _ in range(400):
            with rec._cv, lock:
                if inside[0] <= len(batch) + len(rec._queue):
                    break
            threading.Event().wait(0.002)
        sizes.append(sum(len(r.windows) for r in batch))
        return real_run(batch)

    monkeypatch.setattr(rec, "_run", run)
    barrier = threading.Barrier(n)

    def session(ctl):
        ctl.set_speaking(True)
        ctl.feed_output(out)
        for pos in range(0, mic.size, 320):
            barrier.wait(30)
            with lock:
                inside[0] += 1
            ctl.feed_input(mic[pos : pos + 320])
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=session, args=(c,)) for c in ctls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    decodes = [c.decodes for c in ctls]
    assert min(decodes) >= 3 and len(set(decodes)) == 1, decodes
    assert sum(sizes) == rec.stats.windows >= n * decodes[0]
    # Without merging there would be one call per window; here a tick's windows share calls.
    assert rec.stats.calls <= sum(sizes) / 2, sizes


@pytest.mark.gpu
@requires_speech
def test_cuda_recognizer_gives_the_cpu_decisions(recognizer, windows):
    gpu = _recognizer(device="auto")
    assert gpu.device == "cuda"
    cpu_det = CommandDetector(CommandConfig(), recognizer=recognizer)
    gpu_det = CommandDetector(CommandConfig(), recognizer=gpu)
    thr = cpu_det.config.threshold
    for (t_cpu, f_cpu, c_cpu), (t_gpu, f_gpu, c_gpu) in zip(cpu_det.score_windows(windows[:1]) + [cpu_det.score(w) for w in windows[1:]],
                                                           gpu_det.score_windows(windows[:1]) + [gpu_det.score(w) for w in windows[1:]]):
        assert (f_cpu is not None and c_cpu >= thr) == (f_gpu is not None and c_gpu >= thr), (t_cpu.text, t_gpu.text)


@requires_speech
def test_forced_probabilities_of_the_decoded_tokens_are_the_decoders_own(recognizer, windows):
    """Teacher-forcing the greedy transcript's own tokens gives back, position by position,
    about the probability the free decode gave each of them (the forced pass reuses that
    call's encoder output). About: one token can be up to ~0.2 apart (int8 on AVX2 0.21, on
    AVX-512 0.16; even float32 0.17 on a repeated phrase), so the check is on the mean, and
    that the same probabilities one position off are further apart."""
    prompt = CommandDetector(CommandConfig(), recognizer=recognizer).prompt
    for window in windows[:2]:
        t = recognizer.transcribe(window, prompt, 16)
        encoded = recognizer._local.encoded
        assert encoded is None  # taken by the call that produced t
        recognizer.generate([window], prompt, 16)
        forced = recognizer.force(recognizer._local.encoded, [window], prompt, [(0, 0, [], list(t.tokens))])[0]
        assert len(forced) == len(t.tokens) > 1
        forced, free = np.asarray(forced), np.asarray(t.token_probs)
        aligned = np.abs(forced - free).mean()
        shifted = min(np.abs(forced[1:] - free[:-1]).mean(), np.abs(forced[:-1] - free[1:]).mean())
        assert aligned < 0.1 and aligned < shifted, (t.text, forced, free)


@requires_speech
def test_forced_scoring_finds_the_phrase_only_where_it_was_said(recognizer, windows):
    det = CommandDetector(CommandConfig(forced=True), recognizer=recognizer)
    scores = {}
    for (text, _, _), window in zip(CLIPS, windows):
        (t, found, confidence), = det.score_windows([window])
        spots = det.forced_spots(t)
        assert len(t.forced) == len(spots) > 0, text
        best = det.forced_score(t)
        scores[text] = best[0]
    assert scores["stop omni"] > 0.5 and scores["Stop Omni!"] > 0.5, scores
    assert scores["tell me more"] < 0.1 and scores["stop on my way"] < 0.3, scores
    assert recognizer.stats.forced > 0


def test_forced_scoring_leaves_the_free_readings_punctuation_out_as_the_phrases(recognizer):
    """The ratio of the forced phrase to the free reading of the same words: punctuation
    carries no sound, so the phrase's own "." is not scored, nor is the free reading's."""
    from dataclasses import replace

    from omni2.streaming.listening.interrupt import Transcript, Word

    det = CommandDetector(CommandConfig(forced=True), recognizer=recognizer)
    ids = tuple(recognizer._tok.encode(" Please stop on me.", add_special_tokens=False).ids)
    assert recognizer._tok.decode([ids[-1]]) == "."
    free_word = {}
    for dot in (0.9, 0.05):
        t = Transcript("Please stop on me.", tuple(Word(w, 0.9) for w in ("Please", "stop", "on", "me.")), -0.1,
                       ids, (0, 1, 2, 3), (0.9, 0.9, 0.9, 0.9, dot))
        spots = det.forced_spots(t)
        assert 1 in [j for j, *_ in spots]                    # "stop on me" in place of the phrase
        t = replace(t, forced=tuple((0.5,) * len(ph) for *_, ph in spots))
        det.trace_spots = []
        det.forced_score(t)
        free_word[dot] = [free for j, _, _, free in det.trace_spots if j == 1][0]
    assert free_word[0.9] == free_word[0.05] == pytest.approx(0.9 ** (3 / 2))   # 3 words' tokens, per phrase word


def test_forced_scoring_refuses_rows_of_another_length(recognizer):
    """forced_score pairs each spot with its forced row: a list of another length means the
    rows were scored for other spots, and must not be cut to fit."""
    from dataclasses import replace

    from omni2.streaming.listening.interrupt import Transcript, Word

    det = CommandDetector(CommandConfig(forced=True), recognizer=recognizer)
    ids = tuple(recognizer._tok.encode(" Please stop on me.", add_special_tokens=False).ids)
    t = Transcript("Please stop on me.", tuple(Word(w, 0.9) for w in ("Please", "stop", "on", "me.")), -0.1,
                   ids, (0, 1, 2, 3), (0.9,) * len(ids))
    spots = det.forced_spots(t)
    rows = tuple((0.5,) * len(ph) for *_, ph in spots)
    assert det.forced_score(replace(t, forced=rows)) is not None
    for wrong in (rows + rows[:1], rows[:-1]):
        with pytest.raises(ValueError, match="forced rows"):
            det.forced_score(replace(t, forced=wrong))
