"""One realtime session: the state machine between client events and engine turns.

Client events are handled one at a time, in arrival order (the connection awaits each), so
the state below needs no locks; the only concurrent task is the live response's relay. A
turn is: user input (VAD-cut speech, committed audio, text and/or an image) -> one engine
turn -> one response. Speech that starts while an answer plays cancels it (barge-in).

Speculation: when the VAD hears the quiet that may end a turn (SpeechPaused), the question
it would make is submitted to the engine as a *held* turn, so encoding and prefill overlap
the rest of the silence. At speech_stopped the real question is built as always; if it is
the same question, the held turn is released, else it is cancelled (the engine forgets it)
and the question is submitted afresh. Events on the wire are the same either way.

Context: the conversation (server/conversation.py) knows which engine turn carries each
item, so a deleted item leaves the model's context too, and when the engine drops old turns
to fit its window the session knows which items the model forgot. Item events are in
server/session_items.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import numpy as np

from omni2.model.snac_layout import SAMPLE_RATE as SNAC_RATE
from omni2.model.snac_layout import SAMPLES_PER_FRAME, steps_heard
from omni2.streaming.engine.messages import ContextTruncated, SamplingParams, TurnRequest

from . import events as ev
from . import protocol as p
from .conversation import Conversation, Item, Pending
from .idle_timeout import IdleTimeout
from .input_audio import (RATE, DetectorFactory, InputAudio, Interrupted, Overflow, SpeechPaused,
                          SpeechResumed, SpeechStarted, SpeechStopped)
from .listen_tick import listen_tick
from .metrics import Metrics
from .guard import internal_error
from .out_of_band import OutOfBand
from .outbox import Outbox, SlowReader
from .response import ResponseRun
from .session_config import SessionConfig
from .session_items import ItemEvents, engine_refusal, is_engine_full
from .settings import ServerSettings
from .transcription import Transcriber, transcribe_item

log = logging.getLogger("omni2.server")

KNOWN_EVENTS = {"session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                "input_audio_buffer.clear", "conversation.item.create", "response.create",
                "response.cancel", "conversation.item.truncate", "input_image_buffer.append",
                "conversation.item.retrieve", "conversation.item.delete"}
MAX_ITEMS_TRACKED = 256        # items remembered for truncate / previous_item_id checks
CANCEL_WAIT_S = 10.0           # how long a new answer waits for the interrupted one to close
FRAME_MS = SAMPLES_PER_FRAME * 1000 // SNAC_RATE  # a truncate this close to the end heard it all
TURN_RETRY_S = 0.05            # a turn refused for lack of headroom asks again this often


@dataclass
class Speculation:
    turn: object                     # the engine's held Turn
    request: TurnRequest             # the question it holds (hold=True)


def same_question(a: TurnRequest, b: TurnRequest) -> bool:
    """Whether two requests ask the engine for exactly the same answer."""
    audio_a, audio_b = a.audio_16k, b.audio_16k
    same_audio = (audio_a is None and audio_b is None) or (
        audio_a is not None and audio_b is not None and np.array_equal(audio_a, audio_b))
    return same_audio and (a.session_id, a.image, a.text, a.sampling, a.max_steps, a.keep) == (
        b.session_id, b.image, b.text, b.sampling, b.max_steps, b.keep)


class RealtimeSession(ItemEvents, OutOfBand):
    def __init__(self, *, engine, settings: ServerSettings, metrics: Metrics, outbox: Outbox,
                 model_name: str, detector_factory: DetectorFactory,
                 on_fatal: Optional[Callable[[str], Awaitable[None]]] = None,
                 model_fallback: bool = False, extensions: bool = False,
                 transcriber: Optional[Transcriber] = None, initial_session: Optional[dict] = None):
        self.id = ev.new_id("sess")
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.outbox = outbox
        self.cfg = dataclasses.replace(SessionConfig.default(settings, model_name), extensions=extensions)
        if initial_session:  # a client secret's session configuration (validated when minted)
            self.cfg, _ = self.cfg.apply(initial_session, settings)
        self.model_fallback = model_fallback      # the built-in tiny stand-in: its answers are noise
        self._detector_factory = detector_factory
        self._transcriber = transcriber
        self._transcriptions: set[asyncio.Task] = set()
        self._on_fatal = on_fatal
        self.input: Optional[InputAudio] = None
        self.engine_session: Optional[str] = None
        self.run: Optional[ResponseRun] = None
        self._run_task: Optional[asyncio.Task] = None
        self.conversation = Conversation(MAX_ITEMS_TRACKED)
        self._frame: Optional[bytes] = None       # latest accepted camera frame
        self._frame_at = -1e9
        self._speech_item: Optional[str] = None
        self._spec: Optional[Speculation] = None
        self._pause_frame: Optional[bytes] = None  # latest camera frame when the speech paused
        self._paused = False
        self._idle = IdleTimeout()
        self._drains: set[asyncio.Task] = set()
        self.closed = False

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.engine_session = await self._open_engine_session()
        self.input = await asyncio.to_thread(
            InputAudio, self.cfg.input_format, self.cfg.turn_detection,
            self.settings.max_turn_audio_s, self.settings.idle_audio_keep_s, self._detector_factory)
        await self.outbox.put(ev.session_created(self._wire(self.cfg)))

    def _wire(self, cfg: SessionConfig) -> dict:
        # omni2 extension: clients tell their users that a stand-in answers (the web page shows
        # a notice), as /health/ready's "fallback" tells operators.
        return {**cfg.to_wire(self.id), "model_fallback": self.model_fallback}

    async def _open_engine_session(self) -> str:
        """A slot released by a session that just left is freed at the engine's next step;
        wait that long rather than refuse a client that admission already let in."""
        deadline = time.monotonic() + self.settings.open_session_wait_s
        while True:
            try:
                return await asyncio.to_thread(self.engine.open_session)
            except Exception as exc:
                if not is_engine_full(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.02)

    @property
    def responding(self) -> bool:
        """An answer is live (the idle timeout waits for it to end)."""
        return self.run is not None and not self.run.finished

    @property
    def busy(self) -> bool:
        """A response is live or the user is mid-sentence (idle timeout does not apply)."""
        return (self.run is not None and not self.run.finished) or bool(self.input and self.input.in_speech)

    async def close(self) -> None:
        """Client gone: stop the answer and free the engine slot and context."""
        if self.closed:
            return
        self.closed = True
        self._drop_speculation()
        for task in list(self._transcriptions):
            task.cancel()
        if self.run is not None and not self.run.finished:
            self.run.cancel_reason = self.run.cancel_reason or "client_disconnected"
            self.run.turn.cancel()
        if self._run_task is not None:
            self._run_task.cancel()
            try:
                await self._run_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.run is not None:
            self.run.abandon()  # an answer cut by the disconnect still counts (cancelled)
        if self.engine_session is not None:
            await asyncio.to_thread(self.engine.close_session, self.engine_session)
            self.engine_session = None

    # ---- client events --------------------------------------------------------------------------
    async def handle(self, raw: str | bytes) -> None:
        """One client message; protocol errors become error events (SlowReader propagates)."""
        try:
            event = p.parse_message(raw, self.settings.max_message_bytes, self.settings.max_image_bytes)
        except p.ProtocolError as err:
            self.metrics.events_in_total.inc(label="invalid")
            await self.send_error(err)
            return
        self.metrics.events_in_total.inc(label=event.type if event.type in KNOWN_EVENTS else "other")
        try:
            await self._dispatch(event)
        except p.ProtocolError as err:
            err.event_id = err.event_id or event.event_id
            await self.send_error(err)
        except (SlowReader, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug or an input we did not foresee: this event fails, not the session
            await self.send_error(internal_error(exc, event, self.id))

    async def send_error(self, err: p.ProtocolError) -> None:
        self.metrics.errors_total.inc(label=err.code)
        await self.outbox.put(ev.error(err.type, err.code, err.message, err.param, err.event_id))

    async def _dispatch(self, e: p.ClientEvent) -> None:
        if isinstance(e, p.SessionUpdate):
            await self._session_update(e)
        elif isinstance(e, p.AudioAppend):
            await self._audio_append(e)
        elif isinstance(e, p.AudioCommit):
            await self._audio_commit(e)
        elif isinstance(e, p.AudioClear):
            self._drop_speculation()
            self.input.clear()
            await self.outbox.put(ev.audio_cleared())
        elif isinstance(e, p.ItemCreate):
            await self._item_create(e)
        elif isinstance(e, p.ResponseCreate):
            await self._response_create(e)
        elif isinstance(e, p.ResponseCancel):
            await self._response_cancel(e)
        elif isinstance(e, p.ItemTruncate):
            await self._item_truncate(e)
        elif isinstance(e, p.ImageAppend):
            await self._image_append(e)
        elif isinstance(e, p.ItemRetrieve):
            await self._item_retrieve(e)
        elif isinstance(e, p.ItemDelete):
            await self._item_delete(e)

    async def _session_update(self, e: p.SessionUpdate) -> None:
        cfg, notes = self.cfg.apply(e.session, self.settings)
        self._drop_speculation()
        if (cfg.input_format, cfg.turn_detection) != (self.input.fmt, self.input.turn_detection):
            await asyncio.to_thread(self.input.configure, cfg.input_format, cfg.turn_detection)
            self._idle.arm(self.input.samples_total)
        self.cfg = cfg
        updated = ev.session_updated(self._wire(cfg))
        if notes:
            updated["notes"] = notes  # omni2 extension: settings accepted but without effect
        await self.outbox.put(updated)

    async def _audio_append(self, e: p.AudioAppend) -> None:
        try:
            tick = listen_tick(self.settings.listen_tick_ms, self.settings.listen_quiet_tick_ms)
            happened = await tick.push(self.input, e.audio)
        except ValueError as exc:
            raise p.ProtocolError("invalid_audio", f"Audio cannot be decoded as "
                                  f"{self.input.fmt.encoding}: {exc}.", "audio") from None
        await self._on_input(happened, e.event_id)
        await self._check_idle()

    async def end_stalled_speech(self) -> None:
        """The client sent no audio mid-speech for the stall timeout: the speech ends here."""
        log.info("session %s: no audio for %g s mid-speech; the speech ends there", self.id,
                 self.settings.input_stall_timeout_s)
        await self._on_input(await asyncio.to_thread(self.input.end_speech), None)

    async def _on_input(self, happened: list, event_id: Optional[str]) -> None:
        """What the microphone audio caused (input_audio.InputEvent), in order."""
        for h in happened:
            if isinstance(h, (Interrupted, SpeechResumed, SpeechStarted)):
                self._drop_speculation()
                self._paused = False
            if isinstance(h, Interrupted):
                await self._interrupted(h)
            elif isinstance(h, SpeechStarted):
                self._idle.disarm()
                self._speech_item = ev.new_id("item")
                td = self.cfg.turn_detection
                # Plain VAD: any speech interrupts (OpenAI interrupt_response); a duplex
                # listener decides that itself and reports Interrupted.
                live = self.run is not None and not self.run.finished
                if live and td and td.interrupt_response and not self.input.listener:
                    await self.run.cancel("turn_detected")
                await self.outbox.put(ev.speech_started(h.sample * 1000 // RATE, self._speech_item))
            elif isinstance(h, SpeechPaused):
                # The speech ended here if the quiet lasts: its image is the frame of now.
                self._paused, self._pause_frame = True, self._frame
                await self._speculate(h.audio)
            elif isinstance(h, SpeechStopped):
                stopped_at = time.perf_counter()
                item_id = self._speech_item or ev.new_id("item")
                self._speech_item = None
                if self._paused:
                    self._frame = self._pause_frame
                self._paused, self._pause_frame = False, None
                await self.outbox.put(ev.speech_stopped(h.sample * 1000 // RATE, item_id))
                await self._commit(h.audio, item_id)
                td = self.cfg.turn_detection
                if td is None or td.create_response:
                    await self._start_response(stopped_at)
            elif isinstance(h, Overflow):
                await self.send_error(p.ProtocolError(
                    "input_audio_buffer_full", f"Input audio buffer is full "
                    f"({self.settings.max_turn_audio_s:g} s); {h.dropped_samples / RATE:.2f} s dropped. "
                    "Commit or clear it.", "audio", event_id))

    async def _interrupted(self, h: Interrupted) -> None:
        """Duplex listener: a spoken command or a barge-in over the answer, while it is being
        generated or only still playing (an answer is written faster than it plays, so most
        of it plays after generation ended). Either way the client is told to flush its player
        (speech_started), a live answer is cancelled, and the answer is truncated to what the
        client had played: the item (conversation.item.truncated) and the model's context."""
        self.metrics.interrupts_total.inc(label=h.kind)
        td, run = self.cfg.turn_detection, self.run
        if run is None or not (td is None or td.interrupt_response) or not (h.audible or not run.finished):
            return
        log.info("session %s: %s interrupt (%s) after %d ms played%s", self.id, h.kind, h.phrase or "-",
                 h.played_ms, "" if not run.finished else " (answer already generated)")
        at_ms = h.sample * 1000 // RATE
        command = h.kind == "command"
        if command:  # (a barge-in's speech_started came from the listener with its turn)
            item_id = ev.new_id("item")
            await self.outbox.put(ev.speech_started(at_ms, item_id))
        if not run.finished:
            await self._end_live_answer()
        await self._truncate(run, min(h.played_ms, run.audio_ms))
        if command:  # the command is consumed here: it is not a question
            await self.outbox.put(ev.speech_stopped(at_ms, item_id))

    async def _truncate(self, run: ResponseRun, audio_end_ms: int) -> None:
        """The user heard `audio_end_ms` of this answer: the model's context keeps the decode
        steps whose speech was played in full (snac_layout.steps_heard; a step's text token
        goes with it, and the text runs a few words ahead of the speech); later turns are
        re-prefilled after what stays (engine.forget). Said by conversation.item.truncated."""
        heard_all = run.finished and run.cancel_reason is None and audio_end_ms >= run.audio_ms - FRAME_MS
        if not heard_all:  # (else every step stays: the last steps hold the last frames' layers)
            steps = steps_heard(audio_end_ms * SNAC_RATE // 1000)
            self.engine.forget(self.engine_session, run.turn.id, "answer", keep_steps=steps)
        await self.outbox.put(ev.item_truncated(run.item_id, 0, audio_end_ms))

    async def _check_idle(self) -> None:
        """idle_timeout_ms of quiet: say so, commit the quiet as the user's turn, answer it."""
        td = self.cfg.turn_detection
        if td is None or self.busy or self._paused:
            return
        since = self._idle.due(self.input.samples_total, td.idle_timeout_ms)
        if since is None:
            return
        item_id = ev.new_id("item")
        await self.outbox.put(ev.timeout_triggered(since * 1000 // RATE, self.input.samples_total * 1000 // RATE,
                                                   item_id))
        audio = self.input.commit()
        await self._commit(audio if audio.size >= RATE // 10 else np.zeros(RATE // 10, np.float32), item_id)
        if td.create_response:
            await self._start_response(time.perf_counter())

    async def _audio_commit(self, e: p.AudioCommit) -> None:
        if self.input.buffered_ms < self.settings.min_commit_ms:
            raise p.ProtocolError("input_audio_buffer_commit_empty", "Error committing input audio "
                                  f"buffer: buffer too small. Expected at least {self.settings.min_commit_ms}ms "
                                  f"of audio, but buffer only has {self.input.buffered_ms}ms of audio.")
        self._check_waiting_room(self.input.buffered_ms * RATE // 1000)  # refused: the audio stays buffered
        item_id = self._speech_item or ev.new_id("item")
        self._speech_item = None
        await self._commit(self.input.commit(), item_id, checked=True)

    def _check_waiting_room(self, samples: int) -> None:
        """Committed audio may pile up unanswered only to `max_turn_audio_s`. One turn alone
        is never refused: the buffer already holds it to that limit, and what a commit takes
        can be a little more (the resampler's tail, the append that crossed the limit)."""
        waiting = sum(a.size for a in self.conversation.peek_pending().audio)
        if waiting and waiting + samples > self.settings.max_turn_audio_s * RATE:
            raise p.ProtocolError("input_audio_buffer_full", "Committed audio waiting for a response "
                                  f"exceeds {self.settings.max_turn_audio_s:g} s; send response.create.")

    async def _commit(self, audio: np.ndarray, item_id: str, checked: bool = False) -> None:
        if not checked:
            self._check_waiting_room(audio.size)
        image, self._frame = self._frame, None  # the turn's image is the latest frame when speech ends
        await self.outbox.put(ev.audio_committed(item_id, self.conversation.last_id))
        await self._add_user_item(item_id, [{"type": "input_audio", "transcript": None}],
                                  Pending(audio=[audio], image=image))
        if self.cfg.transcription and self._transcriber is not None:
            self._transcribe(item_id, audio)

    def _transcribe(self, item_id: str, audio: np.ndarray) -> None:
        """Transcription events for a committed item, on the side (the answer does not wait)."""
        def on_text(text: str) -> None:
            item = self.conversation.get(item_id)
            if item is not None:  # a new wire dict: events already queued keep the old one
                content = [{**part, "transcript": text} if part["type"] == "input_audio" else part
                           for part in item.wire["content"]]
                item.wire = {**item.wire, "content": content}

        task = asyncio.create_task(transcribe_item(self._transcriber, audio, self.cfg.transcription, item_id,
                                                   self.outbox.put, on_text), name=f"transcribe {item_id}")
        self._transcriptions.add(task)
        task.add_done_callback(self._transcriptions.discard)

    async def _image_append(self, e: p.ImageAppend) -> None:
        now = time.monotonic()
        if now - self._frame_at < self.settings.image_min_interval_s:
            self.metrics.frames_dropped.inc()
            return
        await asyncio.to_thread(p.verify_image, e.image, self.settings.max_image_pixels, e.param)
        self._frame, self._frame_at = e.image, now

    # ---- responses ------------------------------------------------------------------------------
    async def _response_create(self, e: p.ResponseCreate) -> None:
        if self.run is not None and not self.run.finished:
            raise p.ProtocolError("conversation_already_has_active_response", "Conversation already "
                                  f"has an active response in progress: {self.run.id}. Wait until the "
                                  "response is finished before creating a new one.")
        if e.out_of_band:
            await self._respond_out_of_band(e)
            return
        pend = self.conversation.peek_pending()
        if pend.image is None and self._frame is not None and pend.audio:
            # the camera frame goes with a spoken question only: Mini-Omni2 has no layout for
            # an image with a typed question, so a text turn leaves the frame for the next one
            speech = next(i for i in reversed(self.conversation.pending()) if i.pending.audio)
            speech.pending.image = pend.image = self._frame
            self._frame = None
        if pend.image is not None and not pend.audio:
            raise p.ProtocolError("invalid_input", "Mini-Omni2 takes an image only together with a "
                                  "spoken question: add input_audio to the turn.")
        # Nothing new from the user (a greeting, "say something now"): the minimal question
        # answers from the conversation as it is.
        await self._start_response(time.perf_counter(), e.max_output_tokens, e.output_modalities,
                                   e.metadata)

    async def _response_cancel(self, e: p.ResponseCancel) -> None:
        live = self.run is not None and not self.run.finished
        if not live or (e.response_id is not None and e.response_id != self.run.id):
            raise p.ProtocolError("response_cancel_not_active", "Cancellation failed: no active "
                                  "response found" + (f" with id {e.response_id}." if e.response_id else "."),
                                  "response_id" if e.response_id else None)
        await self.run.cancel("client_cancelled")

    async def _item_truncate(self, e: p.ItemTruncate) -> None:
        record = self.conversation.get(e.item_id)
        if record is None or record.run is None:
            raise p.ProtocolError("item_not_found", f"No assistant item with id '{e.item_id}'.", "item_id")
        if e.content_index != 0:
            raise p.ProtocolError("invalid_value", "content_index must be 0 (one audio part per item).",
                                  "content_index")
        run = record.run
        if not run.finished and run is self.run:
            await self._end_live_answer("client_cancelled")
        elif not run.finished:  # (an out-of-band answer: its own task closes it)
            await run.cancel("client_cancelled")
        if e.audio_end_ms > run.audio_ms:
            raise p.ProtocolError("invalid_value", f"audio_end_ms {e.audio_end_ms} is beyond the "
                                  f"item's audio ({run.audio_ms} ms).", "audio_end_ms")
        await self._truncate(run, e.audio_end_ms)

    async def _start_response(self, started_at: float, max_tokens: Optional[int] = None,
                              modalities: Optional[list[str]] = None, metadata: Optional[dict] = None) -> None:
        await self._end_live_answer()
        item_ids, pend = self.conversation.take_pending()
        request = self._request(pend.audio, pend.image, pend.texts, max_tokens)
        run = await self._launch(request, started_at, modalities, metadata)
        self.conversation.add(Item(run.item_id, "assistant", run=run, part="answer"))
        self.conversation.carry(run.turn.id, item_ids, "prompt")
        self.conversation.carry(run.turn.id, [run.item_id], "answer")

    async def _end_live_answer(self, reason: str = "turn_detected") -> None:
        """Cancel the live answer, if any, and wait until it has closed: its response.done goes
        out before whatever follows (the next answer, a conversation.item.truncated)."""
        if self.run is not None and not self.run.finished:
            await self.run.cancel(reason)
        if self._run_task is not None and not self._run_task.done():
            await asyncio.wait({self._run_task}, timeout=CANCEL_WAIT_S)

    async def _launch(self, request: TurnRequest, started_at: float, modalities: Optional[list[str]] = None,
                      metadata: Optional[dict] = None, in_conversation: bool = True) -> ResponseRun:
        """Submit the question and open its response (in_conversation False: out-of-band)."""
        try:
            turn = await self._submit(request)
            self._idle.disarm()
        except Exception as exc:
            refusal = engine_refusal(exc)
            if refusal is None:
                raise
            raise refusal from None
        cfg = self.cfg
        if modalities is not None:
            cfg = dataclasses.replace(cfg, output_modalities=tuple(modalities))
        own_context = request.session_id == self.engine_session
        run = ResponseRun(turn=turn, cfg=cfg, outbox=self.outbox, metrics=self.metrics,
                          previous_item_id=self.conversation.last_id if in_conversation else None,
                          started_at=started_at, output_lead_s=self.settings.output_lead_s,
                          on_audio=self.input.note_output, on_speaking=self.input.note_speaking,
                          on_truncated=self._on_truncated if own_context else None, metadata=metadata,
                          in_conversation=in_conversation)
        self.run = run
        try:
            await run.open()
        except BaseException:
            turn.cancel()
            raise
        self._run_task = asyncio.create_task(self._drive(run), name=f"response {run.id}")
        return run

    def _request(self, audio: list[np.ndarray], image: Optional[bytes], texts: list[str],
                 max_tokens: Optional[int] = None) -> TurnRequest:
        cfg = self.cfg
        limit = max_tokens or cfg.max_output_tokens or self.settings.max_steps
        # no speech and no text: "" is the minimal question (answer from the context)
        text = "\n".join(texts) if texts else (None if audio else "")
        return TurnRequest(
            session_id=self.engine_session,
            audio_16k=np.concatenate(audio) if audio else None,
            image=image, text=text,
            sampling=SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed),
            max_steps=min(limit, self.settings.max_steps))

    async def _submit(self, request: TurnRequest):
        """The engine turn for `request`: the held speculation if it asked the same, else new."""
        spec, self._spec = self._spec, None
        if spec is not None:
            if same_question(spec.request, request):
                spec.turn.release()
                self.metrics.speculations_total.inc(label="used")
                return spec.turn
            self._discard(spec)
        # Refused for lack of step time (answers playing keep their frames), the turn waits
        # briefly for headroom (an answer ending) before the client is told to retry.
        deadline = time.monotonic() + self.settings.turn_admission_wait_s
        while True:
            try:
                return await asyncio.to_thread(self.engine.submit, request)
            except Exception as exc:
                if getattr(exc, "retry_after_s", None) is None or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(TURN_RETRY_S)

    # ---- speculation ----------------------------------------------------------------------------
    async def _speculate(self, audio: np.ndarray) -> None:
        """Submit the question this pause would end as a held turn (see module docstring)."""
        self._drop_speculation()
        td = self.cfg.turn_detection
        if not self.settings.speculative_turns or td is None or not td.create_response:
            return
        if self.run is not None and not self.run.finished:
            return  # an answer is live (duplex listener): it is not cancelled before the turn ends
        pend = self.conversation.peek_pending()
        image = self._frame if self._frame is not None else pend.image
        request = self._request(pend.audio + [audio], image, pend.texts)
        request.hold = True
        try:
            turn = await asyncio.to_thread(self.engine.submit, request)
        except Exception as exc:  # busy or unacceptable: the turn goes the ordinary way
            log.debug("session %s: no speculation (%s)", self.id, exc)
            return
        self._spec = Speculation(turn, request)

    def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            self._discard(spec)

    def _discard(self, spec: Speculation) -> None:
        spec.turn.cancel()
        self.metrics.speculations_total.inc(label="discarded")
        self._track(spec.turn)  # its admission may have truncated the context: hear of that

    # ---- context window -------------------------------------------------------------------------
    async def _on_truncated(self, e: ContextTruncated) -> None:
        """The engine forgot this session's oldest turns: say which items went."""
        gone = self.conversation.drop_oldest(e.dropped_turns)
        self.metrics.truncations_total.inc()
        log.info("session %s: context full, %d positions (%d turns) forgotten", self.id,
                 e.dropped_positions, e.dropped_turns)
        if not self.closed and self.cfg.extensions:  # an omni2 extension event: opt-in
            await self.outbox.put(ev.context_truncated(gone, e.dropped_positions))

    async def _drive(self, run: ResponseRun) -> None:
        done, error = None, None
        try:
            try:
                done = await run.relay()
            except SlowReader:
                raise
            except Exception as exc:  # engine contract breach: fail this response, keep session
                log.exception("response %s failed", run.id)
                run.turn.cancel()
                error = f"{type(exc).__name__}: {exc}"
            if done is None or "context_start" not in done.stats:
                self.conversation.never_taken(run.turn.id)  # the engine never took this turn in
            await run.close(done, error)
            self._idle.arm_after(run, self.input.samples_total)
        except SlowReader as exc:
            run.turn.cancel()
            if self._on_fatal is not None:
                await self._on_fatal(str(exc))
        finally:
            if run.turn.request.session_id != self.engine_session:  # an out-of-band context
                self.engine.close_session(run.turn.request.session_id)  # quick: no thread needed
