"""One assistant answer on the wire: engine turn events -> Realtime API response events.

A `ResponseRun` sends the opening events, relays the engine's audio and text as deltas while
the turn lives, and always closes with the *.done events and `response.done` carrying the
status the API uses: completed, cancelled (turn_detected / client_cancelled), incomplete
(max_output_tokens) or failed. Audio leaves at playback pace, at most `output_lead_s` ahead
(server/pacer.py), so the answer stays live (cancellable) until its last audio is sent; after a
cancel no further audio is sent, audio still held by the pacer is forgotten and audio already
queued for the socket is withdrawn: what was sent is what the client can have played.
"""
from __future__ import annotations

import base64
import time
from typing import Awaitable, Callable, Optional

import numpy as np

from omni2.model.tokens import N_AUDIO_LAYERS
from omni2.streaming.audio import REALTIME_SAMPLE_RATE, Resampler, encode_output_audio
from omni2.streaming.engine.messages import AudioChunk, ContextTruncated, TextDelta, Turn, TurnDone

from . import events as ev
from .metrics import Metrics
from .outbox import Outbox
from .pacer import AudioPacer
from .session_config import SessionConfig, format_to_wire

AUDIO_CODES_PER_FRAME = N_AUDIO_LAYERS   # SNAC codes per frame

# TurnDone.reason -> (response status, status_details)
_FINAL = {
    "completed": ("completed", None),
    "max_steps": ("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}),
    # the model's own interrupt token (checkpoints that define one): the user said stop
    "interrupted": ("cancelled", {"type": "cancelled", "reason": "turn_detected"}),
}


def _ignore(_) -> None:
    pass


class ResponseRun:
    def __init__(self, *, turn: Turn, cfg: SessionConfig, outbox: Outbox, metrics: Metrics,
                 previous_item_id: Optional[str], started_at: float, output_lead_s: float = 0.0,
                 on_audio: Optional[Callable[[np.ndarray], None]] = None,
                 on_speaking: Optional[Callable[[bool], None]] = None,
                 on_truncated: Optional[Callable[[ContextTruncated], Awaitable[None]]] = None,
                 metadata: Optional[dict] = None, in_conversation: bool = True):
        self.id = ev.new_id("resp")
        self.item_id = ev.new_id("item")
        self.turn = turn
        self.cfg = cfg
        self.outbox = outbox
        self.metrics = metrics
        self.previous_item_id = previous_item_id
        self.started_at = started_at          # end of user speech, or response.create
        self.audio_out = "audio" in cfg.output_modalities
        self.cancel_reason: Optional[str] = None
        self.transcript: list[str] = []
        self.samples_sent = 0                 # output samples at the wire rate
        self.first_audio_at: Optional[float] = None
        self.generated_at: Optional[float] = None  # the engine's TurnDone arrived
        self.finished = False
        self.item_status = "in_progress"
        self.metadata = metadata              # the client's, echoed in response.created / .done
        self.in_conversation = in_conversation  # False: out-of-band, no conversation.item.* events
        # (delta event, its 24 kHz pcm for the listener, wire samples)
        self._pacer: AudioPacer[tuple[dict, np.ndarray, int]] = AudioPacer(output_lead_s, self._emit_audio)
        # The duplex listener hears what we play (echo reference) and when an answer runs.
        self._on_audio = on_audio or _ignore
        self._on_speaking = on_speaking or _ignore
        self._on_truncated = on_truncated
        fmt = cfg.output_format
        self._rate = fmt.sample_rate
        self._sample_bytes = 2 if fmt.encoding == "pcm16" else 1
        self._resampler = (Resampler(REALTIME_SAMPLE_RATE, fmt.sample_rate)
                           if fmt.sample_rate != REALTIME_SAMPLE_RATE else None)

    # ---- state shown in events ----------------------------------------------------------------
    @property
    def audio_ms(self) -> int:
        return self.samples_sent * 1000 // self._rate

    def _part(self, done: bool) -> dict:
        text = "".join(self.transcript) if done else ""
        return {"type": "audio", "transcript": text} if self.audio_out else {"type": "text", "text": text}

    def item_wire(self) -> dict:
        """The assistant item as it stands (conversation.item.retrieve): transcript so far."""
        return self._item(self.item_status, done=True)

    def _item(self, status: str, done: bool) -> dict:
        text = "".join(self.transcript)
        if not done:
            content = []
        elif self.audio_out:
            content = [{"type": "output_audio", "transcript": text}]
        else:
            content = [{"type": "output_text", "text": text}]
        return ev.assistant_item(self.item_id, status, content)

    def _response(self, status: str, details: Optional[dict] = None, usage: Optional[dict] = None,
                  output: Optional[list] = None) -> dict:
        return ev.response_object(
            self.id, status, output or [], list(self.cfg.output_modalities),
            format_to_wire(self.cfg.output_format), self.cfg.voice,
            "inf" if self.cfg.max_output_tokens is None else self.cfg.max_output_tokens,
            status_details=details, usage=usage, metadata=self.metadata,
            in_conversation=self.in_conversation)

    # ---- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        self._on_speaking(True)
        put = self.outbox.put
        await put(ev.response_created(self._response("in_progress")))
        item = self._item("in_progress", done=False)
        await put(ev.output_item_added(self.id, item))
        if self.in_conversation:
            await put(ev.item_added(item, self.previous_item_id))
        await put(ev.content_part_added(self.id, self.item_id, self._part(done=False)))

    async def relay(self) -> TurnDone:
        """Forward the turn's events until its TurnDone; returns it."""
        async for event in self.turn:
            if isinstance(event, TurnDone):
                self.generated_at = time.perf_counter()
                return event
            if isinstance(event, ContextTruncated):  # the session's context, not this answer
                if self._on_truncated is not None:
                    await self._on_truncated(event)
                continue
            if self.cancel_reason is not None:
                continue  # the user interrupted: nothing more of this answer goes out
            if isinstance(event, AudioChunk):
                if self.audio_out:
                    await self._send_audio(event.pcm)
            elif isinstance(event, TextDelta) and event.text:
                self.transcript.append(event.text)
                if self.audio_out:
                    await self.outbox.put(ev.transcript_delta(self.id, self.item_id, event.text))
                else:
                    await self.outbox.put(ev.text_delta(self.id, self.item_id, event.text))
        raise RuntimeError("engine turn ended without TurnDone")  # contract breach

    async def _send_audio(self, pcm: np.ndarray, final: bool = False) -> None:
        """Encode a chunk and hand it to the pacer (sent now, or when playback needs it)."""
        x24 = np.asarray(pcm, dtype=np.float32).reshape(-1)
        x = x24
        if self._resampler is not None:
            x = self._resampler.flush() if final else self._resampler.process(x24)
        if x.size == 0:
            if x24.size:
                self._on_audio(x24)
            return
        data = encode_output_audio(x, self.cfg.output_format)
        delta = ev.audio_delta(self.id, self.item_id, base64.b64encode(data).decode())
        await self._pacer.push((delta, x24, x.size), x.size / self._rate)

    async def _emit_audio(self, item: tuple[dict, np.ndarray, int]) -> None:
        """The pacer let a chunk go: from here on the client may play it."""
        delta, x24, n = item
        if x24.size:
            self._on_audio(x24)  # the listener's echo reference and audible window follow what is sent
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
            self.metrics.ttfa.observe(self.first_audio_at - self.started_at)
        self.samples_sent += n
        await self.outbox.put(delta)

    async def cancel(self, reason: str) -> None:
        """Stop the answer now: engine stops at its next step, queued audio is withdrawn."""
        if self.cancel_reason is not None or self.finished:
            return
        self.cancel_reason = reason
        self.turn.cancel()
        self._pacer.drop()  # never sent: nothing to subtract
        for dropped in await self.outbox.drop_audio(self.id):
            nbytes = len(base64.b64decode(dropped["delta"]))
            self.samples_sent -= nbytes // self._sample_bytes

    async def close(self, done: Optional[TurnDone], error: Optional[str] = None) -> str:
        """Send the closing events once the paced audio is out; returns the response status."""
        if self.audio_out and self._resampler is not None and self.cancel_reason is None:
            await self._send_audio(np.zeros(0, np.float32), final=True)
        await self._pacer.drained()  # a cancel meanwhile drops the rest and ends the wait
        self._on_speaking(False)
        if self.cancel_reason is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": self.cancel_reason}
        elif done is None or done.reason in ("error", "cancelled"):
            # 'cancelled' without our cancel: the engine dropped the turn (session closed).
            message = error or (done.error if done else None) or "the engine stopped this turn"
            status = "failed"
            details = {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                   "message": message}}
        else:
            status, details = _FINAL.get(done.reason, ("completed", None))
        if done is not None and status in ("completed", "incomplete"):
            # The engine's full text is authoritative; the deltas must add up to it (tested).
            self.transcript = [done.text]
        text = "".join(self.transcript)
        put = self.outbox.put
        if self.audio_out:
            await put(ev.audio_done(self.id, self.item_id))
            await put(ev.transcript_done(self.id, self.item_id, text))
        else:
            await put(ev.text_done(self.id, self.item_id, text))
        await put(ev.content_part_done(self.id, self.item_id, self._part(done=True)))
        self.item_status = "completed" if status == "completed" else "incomplete"
        item = self._item(self.item_status, done=True)
        await put(ev.output_item_done(self.id, item))
        if self.in_conversation:
            await put(ev.item_done(item, self.previous_item_id))
        await put(ev.response_done(self._response(status, details, self._usage(done), [item])))
        self._finish(status)
        return status

    def abandon(self) -> None:
        """The connection ended before the answer closed: no events can go out, but the
        answer is counted (cancelled, with the cancel reason the session set)."""
        if not self.finished:
            self._on_speaking(False)
            self._finish("cancelled")

    def _finish(self, status: str) -> None:
        """Count the answer and let go of what only a live answer needs. The pacer's callback
        is this run's own method and the others are the session's: kept, they would make the
        run, its engine turn (with the question's audio and image) and a closed session a
        reference cycle, freed only by Python's full collection, which a busy server runs every
        few minutes; RSS kept the heap's high-water mark of what waited for it (issue 19). The
        conversation keeps a finished run for its item (truncate, retrieve): state only."""
        self.finished = True
        self._account(status)
        self._pacer.close()
        self._on_audio = _ignore
        self._on_speaking = _ignore
        self._on_truncated = None

    def _usage(self, done: Optional[TurnDone]) -> dict:
        """Token counts as the engine reports them: prompt positions in, one text token and
        one 7-code SNAC frame per decode step out (Mini-Omni2 decodes both in parallel)."""
        stats = done.stats if done else {}
        frames = done.frames_generated if done else 0
        inputs = int(stats.get("prompt_positions", 0))
        text_tokens = int(stats.get("steps", frames))
        audio_tokens = frames * AUDIO_CODES_PER_FRAME
        return {
            "total_tokens": inputs + text_tokens + audio_tokens,
            "input_tokens": inputs,
            "output_tokens": text_tokens + audio_tokens,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0,
                                    "cached_tokens": 0},
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        }

    def _account(self, status: str) -> None:
        m = self.metrics
        m.responses_total.inc(label=status)
        if self.cancel_reason:
            m.cancels_total.inc(label=self.cancel_reason)
        seconds = self.samples_sent / self._rate
        m.audio_out_seconds.inc(seconds)
        if status == "completed" and seconds > 0:  # generation time, not the paced sending
            m.rtf.observe(((self.generated_at or time.perf_counter()) - self.started_at) / seconds)
