"""The vocoder worker: turns each live answer's frames into streamed 24 kHz audio.

It runs on its own thread so SNAC work never delays a decode step, and is the one that ends
a turn: a turn's `TurnDone` is emitted here, after its last audio (or, when cancelled, after
dropping the audio not yet sent), so TurnDone is always the last event a reader sees.

Scheduling (one SNAC call per pass, then the inbox is read again):

* every window has the same width once an answer has `window_frames` frames (FrameDecoder), so
  the windows of many sessions share one batched call: on a CPU a call costs about the same
  number of Python-level torch ops whatever its batch, and each op hands the GIL back and forth
  with the server's other threads, so fewer, fuller calls keep the vocoder near its compute
  cost (measured: one 10-frame window alone took 72 ms of wall time for 9 ms of CPU next to a
  busy Python thread);
* earliest deadline first: a playing answer's deadline is when its listener runs out of
  audio (first audio + audio emitted), an answer without audio yet must start within
  `first_audio_s` of its submission; the most urgent window picks the call's width and the
  most urgent windows of that width fill it, up to `batch_frames` frames.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from omni2.model.snac_layout import SAMPLE_RATE, SAMPLES_PER_FRAME

from .frame_decoder import FrameDecoder, decode_groups
from .messages import STOPPED_REASONS, AudioChunk, Turn, TurnDone


@dataclass
class _Voice:
    turn: Turn
    decoder: Optional[FrameDecoder]
    ending: Optional[TurnDone] = None  # set when the engine finished the turn
    frames_emitted: int = 0
    samples_emitted: int = 0
    first_audio_at: Optional[float] = None

    def deadline(self, first_audio_s: float) -> float:
        """perf_counter time by which this answer needs its next audio."""
        if self.first_audio_at is None:
            return self.turn.started_at + first_audio_s
        return self.first_audio_at + self.samples_emitted / SAMPLE_RATE


def plan_call(ready: list, batch_frames: int, slack_s: float = float("inf")) -> list:
    """ready: (deadline, window, owner) tuples; the ones to decode in the next SNAC call: the
    most urgent, then the most urgent others of the same width due within `slack_s` of it, at
    most `batch_frames` frames (at least one window)."""
    ready = sorted(ready, key=lambda r: r[0])
    width = int(ready[0][1].frames.shape[0])
    take = max(1, batch_frames // width)
    due_by = ready[0][0] + slack_s
    return [r for r in ready if int(r[1].frames.shape[0]) == width and r[0] <= due_by][:take]


class Vocoder:
    def __init__(self, snac: Optional[torch.nn.Module], group_frames: int, on_first_audio=None,
                 threads: Optional[int] = None, window_frames: Optional[int] = None,
                 batch_frames: int = 96, first_audio_s: float = 0.25, batch_slack_s: float = 0.5) -> None:
        self.snac = snac
        self.threads = threads  # torch threads of the worker (CPU: 1, see cpu_threads; None: as is)
        self.group_frames = group_frames
        self.window_frames = window_frames  # fixed window width (FrameDecoder); None: unbounded windows
        self.batch_frames = batch_frames  # frames in one SNAC call at most (one window always fits)
        self.first_audio_s = first_audio_s  # deadline of an answer's first audio after submission
        self.batch_slack_s = batch_slack_s  # a call takes windows due within this of its most urgent
        self.on_first_audio = on_first_audio  # callback(turn, seconds since submit)
        # since start, read by Engine.stats(): SNAC calls, windows, audio made, and the wall and
        # thread CPU seconds spent in the calls (audio / busy: what the vocoder can keep up with)
        self.counters = {"calls": 0, "windows": 0, "audio_seconds": 0.0, "busy_seconds": 0.0, "cpu_seconds": 0.0}
        self._inbox: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._voices: dict[int, _Voice] = {}
        self._thread = threading.Thread(target=self._run, name="omni2-vocoder", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; turns it still holds end now (their unsent audio is dropped)."""
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)
        self._drain(block=False)
        for voice in list(self._voices.values()):
            if voice.ending is None:
                voice.ending = TurnDone(reason="cancelled", frames_generated=0, frames_emitted=0, text="",
                                        error="engine stopped")
            self._close(voice)

    # ---- called by the engine thread ----------------------------------------------------
    def open(self, turn: Turn) -> None:
        self._inbox.put(("open", turn))

    def frames(self, turn: Turn, frames: torch.Tensor) -> None:
        self._inbox.put(("frames", turn, frames))

    def finish(self, turn: Turn, done: TurnDone) -> None:
        """End of the answer: flush the tail (or drop it when cancelled), then emit `done`."""
        self._inbox.put(("finish", turn, done))

    # ---- worker --------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind = msg[0]
            if kind == "open":
                decoder = (FrameDecoder(self.snac, group_frames=self.group_frames, window_frames=self.window_frames)
                           if self.snac is not None else None)
                self._voices[msg[1].id] = _Voice(msg[1], decoder)
            elif kind == "frames":
                voice = self._voices.get(msg[1].id)
                if voice is not None and voice.decoder is not None and not voice.turn.cancel_requested:
                    voice.decoder.append(msg[2])
            elif kind == "finish":
                voice = self._voices.get(msg[1].id)
                if voice is not None:
                    voice.ending = msg[2]
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        if self.threads is not None:
            from ..cpu.threads import use_threads

            use_threads(self.threads)
        while not self._stop.is_set():
            self._drain(block=not self._voices)
            if not self._voices:
                continue
            self._work()

    @torch.inference_mode()
    def _work(self) -> None:
        ready = []
        for voice in list(self._voices.values()):
            if voice.ending is not None and (voice.ending.reason in STOPPED_REASONS or voice.decoder is None):
                self._close(voice)  # cancelled: whatever was not sent yet is dropped
                continue
            if voice.decoder is None:
                continue
            w = voice.decoder.next_window(final=voice.ending is not None)
            if w is not None:
                ready.append((voice.deadline(self.first_audio_s), w, voice))
            elif voice.ending is not None:
                self._close(voice)
        if not ready:
            if self._voices:
                self._drain(block=True)
            return
        call = plan_call(ready, self.batch_frames, self.batch_slack_s)
        windows = [w for _, w, _ in call]
        wall, cpu = time.perf_counter(), time.thread_time()
        decoded = decode_groups(self.snac, windows)
        c = self.counters
        c["busy_seconds"] += time.perf_counter() - wall
        c["cpu_seconds"] += time.thread_time() - cpu
        c["calls"] += 1
        c["windows"] += len(windows)
        for (_, window, voice), audio in zip(call, decoded):
            pcm = voice.decoder.accept(window, audio)
            c["audio_seconds"] += pcm.size / SAMPLE_RATE
            if voice.turn.cancel_requested:
                continue
            if pcm.size:
                # A wide window makes ~1.6 s of audio: it leaves in group-sized chunks, so the
                # server's pacer and the listener's buffer see the usual chunk sizes.
                piece = self.group_frames * SAMPLES_PER_FRAME
                for at in range(0, pcm.size, piece):
                    part = pcm[at : at + piece]
                    voice.samples_emitted += part.size
                    done_frames = voice.samples_emitted // SAMPLES_PER_FRAME
                    voice.turn._emit(AudioChunk(pcm=part, frames=done_frames - voice.frames_emitted))
                    voice.frames_emitted = done_frames
                if voice.first_audio_at is None:
                    voice.first_audio_at = time.perf_counter()
                    if self.on_first_audio:
                        self.on_first_audio(voice.turn, voice.first_audio_at - voice.turn.started_at)

    def _close(self, voice: _Voice) -> None:
        del self._voices[voice.turn.id]
        done = voice.ending
        stats = dict(done.stats)
        if voice.first_audio_at is not None:
            stats["time_to_first_audio_s"] = voice.first_audio_at - voice.turn.started_at
        voice.turn._emit(replace(done, frames_emitted=voice.frames_emitted, stats=stats))
