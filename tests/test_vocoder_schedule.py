"""Fixed-width SNAC windows (batched across answers) and the vocoder's earliest-deadline order.

The audio must stay what a one-shot decode of the whole utterance gives (same 1e-3 bar as
tests/test_snac.py), however the frames arrive and however far behind the vocoder is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from omni2.model import tokens
from omni2.model.snac_codec import decode_frames, load_snac, write_tiny_snac
from omni2.model.snac_layout import SAMPLES_PER_FRAME
from omni2.streaming.engine import vocoder as vocoder_mod
from omni2.streaming.engine.frame_decoder import DecodeWindow, FrameDecoder
from omni2.streaming.engine.messages import AudioChunk, Turn, TurnDone, TurnRequest
from omni2.streaming.engine.vocoder import Vocoder, plan_call


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_snac(str(write_tiny_snac(tmp_path_factory.mktemp("snac"), seed=0)))


def random_frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens.SNAC_CODEBOOK, (n, 7), generator=g)


def stream(decoder, frames, chunk):
    """Push `chunk` frames at a time, decoding every window that is due (a vocoder that is
    behind sees many frames at once); returns the audio and (width, frames received, final)
    of every window."""
    parts, widths = [], []

    def run(final):
        while (w := decoder.next_window(final=final)) is not None:
            widths.append((int(w.frames.shape[0]), decoder.n_frames, final))
            audio = decode_frames(decoder.snac, w.frames.unsqueeze(0), [w.start_frame])[0].numpy()
            parts.append(decoder.accept(w, audio))

    for i in range(0, len(frames), chunk):
        decoder.append(frames[i : i + chunk])
        run(final=False)
    run(final=True)
    return np.concatenate(parts), widths


@pytest.mark.parametrize("n_frames,width,chunk", [(40, 12, 1), (40, 12, 40), (61, 24, 7), (30, 24, 3), (9, 12, 4)])
def test_fixed_width_windows_equal_one_shot(tiny, n_frames, width, chunk):
    frames = random_frames(n_frames, seed=n_frames + width)
    whole = decode_frames(tiny, frames)[0].numpy()
    out, widths = stream(FrameDecoder(tiny, group_frames=4, window_frames=width), frames, chunk)
    assert out.shape == whole.shape and np.abs(out - whole).max() < 1e-3
    # Every window is `width` wide (what lets answers share a call), but the last of an
    # utterance shorter than that ...
    assert all(w == (min(width, received) if final else width) for w, received, final in widths)
    if n_frames < width:
        assert any(w < width for w, _, _ in widths)
    # ... and each one emits new samples: a decoder far behind catches up in W-wide steps.
    new_per_window = width - 3 - 5268 / SAMPLES_PER_FRAME
    assert len(widths) <= n_frames / 4 + 1 + max(0, n_frames - width) / new_per_window


def test_window_too_narrow_for_context_and_hold_back_is_refused(tiny):
    with pytest.raises(ValueError, match="window_frames"):
        FrameDecoder(tiny, window_frames=5)   # 3 context + 2.57 held back leave nothing
    FrameDecoder(tiny, window_frames=7)


def _window(width):
    return DecodeWindow(frames=torch.zeros((width, 7), dtype=torch.long))


def test_plan_call_takes_the_most_urgent_and_its_width():
    ready = [(5.0, _window(24), "over budget"), (1.0, _window(24), "urgent"), (2.0, _window(8), "other width"),
             (3.0, _window(24), "next"), (4.0, _window(24), "later")]
    assert [r[2] for r in plan_call(ready, batch_frames=72)] == ["urgent", "next", "later"]
    assert [r[2] for r in plan_call(ready, batch_frames=48)] == ["urgent", "next"]
    assert [r[2] for r in plan_call(ready, batch_frames=10)] == ["urgent"]   # one window always goes
    ready[2] = (0.5, _window(8), "first audio")
    assert [r[2] for r in plan_call(ready, batch_frames=96)] == ["first audio"]


def test_plan_call_leaves_windows_that_can_wait_out_of_an_urgent_call():
    ready = [(10.0, _window(24), "first audio"), (10.3, _window(24), "due soon"), (12.0, _window(24), "buffered"),
             (13.0, _window(24), "buffered too")]
    assert [r[2] for r in plan_call(ready, batch_frames=96, slack_s=0.5)] == ["first audio", "due soon"]
    assert [r[2] for r in plan_call(ready[2:], batch_frames=96, slack_s=0.5)] == ["buffered"]
    assert len(plan_call(ready, batch_frames=96)) == 4   # no slack given: as many as fit


def test_vocoder_decodes_the_answer_that_runs_out_first(tiny, monkeypatch):
    """Three answers wait with all their frames; one window per call: the order of the calls
    follows each listener's playback time left, and every answer's audio is its one-shot decode."""
    calls = []
    real = vocoder_mod.decode_groups

    def recording(snac, windows):
        calls.append(tuple(w.start_frame for w in windows))
        return real(snac, windows)

    monkeypatch.setattr(vocoder_mod, "decode_groups", recording)
    voc = Vocoder(tiny, group_frames=4, window_frames=12, batch_frames=12)
    turns = [Turn(TurnRequest(session_id=f"s{i}")) for i in range(3)]
    utterances = [random_frames(30, seed=40 + i) for i in range(3)]
    for turn, frames in zip(turns, utterances):
        voc.open(turn)
        voc.frames(turn, frames)
        voc.finish(turn, TurnDone(reason="completed", frames_generated=30, frames_emitted=0, text=""))
    voc._drain(block=False)
    # Each has already played for a while: turn 1 has 1 s of audio left, turn 0 2 s, turn 2 3 s
    # (as if its first audio had come `left` seconds from now with nothing emitted since).
    for i, left in ((0, 2.0), (1, 1.0), (2, 3.0)):
        voc._voices[turns[i].id].first_audio_at = left
    index = {id(voc._voices[t.id].decoder): i for i, t in enumerate(turns)}
    order = []
    real_accept = FrameDecoder.accept

    def accept(self, window, audio):
        order.append(index[id(self)])
        waiting = [v.deadline(voc.first_audio_s) for v in voc._voices.values()
                   if v.decoder.emitted < v.decoder.n_frames * SAMPLES_PER_FRAME]
        assert voc._voices[turns[order[-1]].id].deadline(voc.first_audio_s) == min(waiting)
        return real_accept(self, window, audio)

    monkeypatch.setattr(FrameDecoder, "accept", accept)
    while voc._voices:
        voc._work()
    # Turn 1 (1 s left) is decoded until it has more than turn 0's 2 s, then they alternate
    # with turn 2 joining once both are past its 3 s: never a window of a later deadline first.
    assert order[:2] == [1, 1] and order[2] == 0 and 2 not in order[:4]
    assert all(len(c) == 1 for c in calls) and sorted(set(order)) == [0, 1, 2]
    figures = voc.counters
    assert figures["calls"] == figures["windows"] == len(calls) and figures["busy_seconds"] > 0
    assert figures["audio_seconds"] == pytest.approx(3 * 30 * SAMPLES_PER_FRAME / 24000)
    for turn, frames in zip(turns, utterances):
        events = []
        while not turn._events.empty():
            events.append(turn._events.get())
        chunks = [e for e in events if isinstance(e, AudioChunk)]
        assert max(len(e.pcm) for e in chunks) <= 4 * SAMPLES_PER_FRAME      # group-sized chunks
        assert sum(e.frames for e in chunks) == 30
        pcm = np.concatenate([e.pcm for e in chunks])
        whole = decode_frames(tiny, frames)[0].numpy()
        assert isinstance(events[-1], TurnDone) and pcm.shape == whole.shape
        assert np.abs(pcm - whole).max() < 1e-3
