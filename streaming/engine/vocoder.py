"""The vocoder worker: turns each live answer's frames into streamed 24 kHz audio.

It runs on its own thread so SNAC work never delays a decode step, batches equal-length
windows of several sessions into one SNAC call, and is the one that ends a turn: a turn's
`TurnDone` is emitted here, after its last audio (or, when cancelled, after dropping the
audio not yet sent), so TurnDone is always the last event a reader sees.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from omni2.model.snac_layout import SAMPLES_PER_FRAME

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


class Vocoder:
    def __init__(self, snac: Optional[torch.nn.Module], group_frames: int, on_first_audio=None,
                 threads: Optional[int] = None) -> None:
        self.snac = snac
        self.threads = threads  # torch threads of the worker (CPU: 1, see cpu_threads; None: as is)
        self.group_frames = group_frames
        self.on_first_audio = on_first_audio  # callback(turn, seconds since submit)
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
                decoder = FrameDecoder(self.snac, group_frames=self.group_frames) if self.snac is not None else None
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
        windows, owners = [], []
        for voice in list(self._voices.values()):
            if voice.ending is not None and (voice.ending.reason in STOPPED_REASONS or voice.decoder is None):
                self._close(voice)  # cancelled: whatever was not sent yet is dropped
                continue
            if voice.decoder is None:
                continue
            w = voice.decoder.next_window(final=voice.ending is not None)
            if w is not None:
                windows.append(w)
                owners.append(voice)
            elif voice.ending is not None:
                self._close(voice)
        if not windows:
            if self._voices:
                self._drain(block=True)
            return
        for voice, window, audio in zip(owners, windows, decode_groups(self.snac, windows)):
            pcm = voice.decoder.accept(window, audio)
            if voice.turn.cancel_requested:
                continue
            if pcm.size:
                voice.samples_emitted += pcm.size
                done_frames = voice.samples_emitted // SAMPLES_PER_FRAME
                voice.turn._emit(AudioChunk(pcm=pcm, frames=done_frames - voice.frames_emitted))
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
