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

Context: the session knows which items each engine turn carried, so when the engine drops
old turns to fit its window, the client hears which items the model forgot.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import numpy as np

from omni2.model.snac_layout import SAMPLE_RATE as SNAC_RATE
from omni2.model.snac_layout import steps_heard
from omni2.streaming.audio import decode_input_audio, resample
from omni2.streaming.messages import ContextTruncated, SamplingParams, TurnRequest

from . import events as ev
from . import protocol as p
from .input_audio import (RATE, DetectorFactory, InputAudio, Interrupted, Overflow, SpeechPaused,
                          SpeechResumed, SpeechStarted, SpeechStopped)
from .metrics import Metrics
from .outbox import Outbox, SlowReader
from .response import ResponseRun
from .session_config import SessionConfig
from .settings import ServerSettings

log = logging.getLogger("omni2.server")

KNOWN_EVENTS = {"session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                "input_audio_buffer.clear", "conversation.item.create", "response.create",
                "response.cancel", "conversation.item.truncate", "input_image_buffer.append"}
MAX_ITEMS_TRACKED = 256        # items remembered for truncate / previous_item_id checks
CANCEL_WAIT_S = 10.0           # how long a new answer waits for the interrupted one to close
TURN_RETRY_S = 0.05            # a turn refused for lack of headroom asks again this often


def is_engine_full(exc: BaseException) -> bool:
    """EngineFull from the real engine or a stand-in (matched by name, no import of torch)."""
    return any(cls.__name__ == "EngineFull" for cls in type(exc).__mro__)


@dataclass
class ItemRecord:
    role: str
    run: Optional[ResponseRun] = None


@dataclass
class Speculation:
    turn: object                     # the engine's held Turn
    request: TurnRequest             # the question it holds (hold=True)


def same_question(a: TurnRequest, b: TurnRequest) -> bool:
    """Whether two requests ask the engine for exactly the same answer."""
    audio_a, audio_b = a.audio_16k, b.audio_16k
    same_audio = (audio_a is None and audio_b is None) or (
        audio_a is not None and audio_b is not None and np.array_equal(audio_a, audio_b))
    return same_audio and (a.session_id, a.image, a.text, a.sampling, a.max_steps) == (
        b.session_id, b.image, b.text, b.sampling, b.max_steps)


class RealtimeSession:
    def __init__(self, *, engine, settings: ServerSettings, metrics: Metrics, outbox: Outbox,
                 model_name: str, detector_factory: DetectorFactory,
                 on_fatal: Optional[Callable[[str], Awaitable[None]]] = None,
                 model_fallback: bool = False):
        self.id = ev.new_id("sess")
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.outbox = outbox
        self.cfg = SessionConfig.default(settings, model_name)
        self.model_fallback = model_fallback      # the built-in tiny stand-in: its answers are noise
        self._detector_factory = detector_factory
        self._on_fatal = on_fatal
        self.input: Optional[InputAudio] = None
        self.engine_session: Optional[str] = None
        self.run: Optional[ResponseRun] = None
        self._run_task: Optional[asyncio.Task] = None
        self._audio: list[np.ndarray] = []        # committed user audio not yet answered
        self._texts: list[str] = []
        self._image: Optional[bytes] = None       # image for the next turn
        self._frame: Optional[bytes] = None       # latest accepted camera frame
        self._frame_at = -1e9
        self._items: collections.OrderedDict[str, ItemRecord] = collections.OrderedDict()
        self._last_item: Optional[str] = None
        self._speech_item: Optional[str] = None
        self._spec: Optional[Speculation] = None
        self._pause_frame: Optional[bytes] = None  # latest camera frame when the speech paused
        self._paused = False
        self._uncounted_items: list[str] = []   # user items not yet carried by an engine turn
        self._context: collections.deque[list[str]] = collections.deque()  # items per engine turn
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
    def busy(self) -> bool:
        """A response is live or the user is mid-sentence (idle timeout does not apply)."""
        return (self.run is not None and not self.run.finished) or bool(self.input and self.input.in_speech)

    async def close(self) -> None:
        """Client gone: stop the answer and free the engine slot and context."""
        if self.closed:
            return
        self.closed = True
        self._drop_speculation()
        if self.run is not None and not self.run.finished:
            self.run.cancel_reason = self.run.cancel_reason or "client_cancelled"
            self.run.turn.cancel()
        if self._run_task is not None:
            self._run_task.cancel()
            try:
                await self._run_task
            except (asyncio.CancelledError, Exception):
                pass
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

    async def _session_update(self, e: p.SessionUpdate) -> None:
        cfg, notes = self.cfg.apply(e.session, self.settings)
        self._drop_speculation()
        if (cfg.input_format, cfg.turn_detection) != (self.input.fmt, self.input.turn_detection):
            await asyncio.to_thread(self.input.configure, cfg.input_format, cfg.turn_detection)
        self.cfg = cfg
        updated = ev.session_updated(self._wire(cfg))
        if notes:
            updated["notes"] = notes  # omni2 extension: settings accepted but without effect
        await self.outbox.put(updated)

    async def _audio_append(self, e: p.AudioAppend) -> None:
        try:
            happened = await asyncio.to_thread(self.input.push, e.audio)
        except ValueError as exc:
            raise p.ProtocolError("invalid_audio", f"Audio cannot be decoded as "
                                  f"{self.input.fmt.encoding}: {exc}.", "audio") from None
        for h in happened:
            if isinstance(h, (Interrupted, SpeechResumed, SpeechStarted)):
                self._drop_speculation()
                self._paused = False
            if isinstance(h, Interrupted):
                await self._interrupted(h)
            elif isinstance(h, SpeechStarted):
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
                    "Commit or clear it.", "audio", e.event_id))

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
            await run.cancel("turn_detected")
        await self._truncate(run, min(h.played_ms, run.audio_ms))
        if command:  # the command is consumed here: it is not a question
            await self.outbox.put(ev.speech_stopped(at_ms, item_id))

    async def _truncate(self, run: ResponseRun, audio_end_ms: int) -> None:
        """The user heard `audio_end_ms` of this answer: the model's context keeps the decode
        steps whose speech was played in full (snac_layout.steps_heard; a step's text token
        goes with it, and the text runs a few words ahead of the speech), if the answer is
        still the conversation's last turn. Said to the client by conversation.item.truncated."""
        steps = steps_heard(audio_end_ms * SNAC_RATE // 1000)
        await asyncio.to_thread(self.engine.truncate_answer, self.engine_session, run.turn, steps)
        await self.outbox.put(ev.item_truncated(run.item_id, 0, audio_end_ms))

    async def _audio_commit(self, e: p.AudioCommit) -> None:
        if self.input.buffered_ms < self.settings.min_commit_ms:
            raise p.ProtocolError("input_audio_buffer_commit_empty", "Error committing input audio "
                                  f"buffer: buffer too small. Expected at least {self.settings.min_commit_ms}ms "
                                  f"of audio, but buffer only has {self.input.buffered_ms}ms of audio.")
        item_id = self._speech_item or ev.new_id("item")
        self._speech_item = None
        await self._commit(self.input.commit(), item_id)

    async def _commit(self, audio: np.ndarray, item_id: str) -> None:
        pending = sum(a.size for a in self._audio) + audio.size
        if pending > self.settings.max_turn_audio_s * RATE:
            raise p.ProtocolError("input_audio_buffer_full", "Committed audio waiting for a response "
                                  f"exceeds {self.settings.max_turn_audio_s:g} s; send response.create.")
        self._audio.append(audio)
        if self._frame is not None:  # the turn's image is the latest frame when speech ends
            self._image, self._frame = self._frame, None
        await self.outbox.put(ev.audio_committed(item_id, self._last_item))
        await self._add_user_item(item_id, [{"type": "input_audio", "transcript": None}])

    async def _add_user_item(self, item_id: str, content: list[dict]) -> None:
        item = ev.user_item(item_id, content)
        await self.outbox.put(ev.item_added(item, self._last_item))
        await self.outbox.put(ev.item_done(item, self._last_item))
        self._remember(item_id, ItemRecord("user"))
        self._uncounted_items.append(item_id)

    def _remember(self, item_id: str, record: ItemRecord) -> None:
        self._items[item_id] = record
        self._last_item = item_id
        while len(self._items) > MAX_ITEMS_TRACKED:
            self._items.popitem(last=False)

    async def _item_create(self, e: p.ItemCreate) -> None:
        if e.previous_item_id is not None and e.previous_item_id != self._last_item:
            raise p.ProtocolError("invalid_value", "Items can only be appended at the end of the "
                                  "conversation (the model's context is append-only).", "previous_item_id")
        texts, audio, image, content = [], [], None, []
        for part in e.parts:
            if part.kind == "text":
                texts.append(part.text)
                content.append({"type": "input_text", "text": part.text})
            elif part.kind == "audio":
                audio.append(await asyncio.to_thread(self._decode_item_audio, part))
                content.append({"type": "input_audio", "transcript": None})
            else:
                await asyncio.to_thread(p.verify_image, part.data, self.settings.max_image_pixels, part.param)
                image = part.data
                content.append({"type": "input_image", "image_url": None, "detail": "auto"})
        if len(self._texts) + len(texts) > self.settings.max_pending_texts:
            raise p.ProtocolError("too_many_items", f"More than {self.settings.max_pending_texts} text "
                                  "parts wait for a response; send response.create.", "item.content")
        pending = sum(a.size for a in self._audio) + sum(a.size for a in audio)
        if pending > self.settings.max_turn_audio_s * RATE:
            raise p.ProtocolError("input_audio_buffer_full", "Audio waiting for a response exceeds "
                                  f"{self.settings.max_turn_audio_s:g} s.", "item.content")
        self._texts += texts
        self._audio += audio
        if image is not None:
            self._image = image
        await self._add_user_item(e.item_id or ev.new_id("item"), content)

    def _decode_item_audio(self, part: p.UserPart) -> np.ndarray:
        try:
            x, sr = decode_input_audio(part.data, self.cfg.input_format)
        except ValueError as exc:
            raise p.ProtocolError("invalid_audio", f"Audio cannot be decoded: {exc}.", part.param) from None
        return resample(x, sr, RATE) if sr != RATE else x

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
        if not (self._audio or self._texts or self._image or self._frame):
            raise p.ProtocolError("no_input", "Nothing to answer: commit audio or create a user "
                                  "item first.")
        if self._image is None and self._frame is not None and self._audio:
            # the camera frame goes with a spoken question only: Mini-Omni2 has no layout for
            # an image with a typed question, so a text turn leaves the frame for the next one
            self._image, self._frame = self._frame, None
        if self._image is not None and not self._audio:
            raise p.ProtocolError("invalid_input", "Mini-Omni2 takes an image only together with a "
                                  "spoken question: add input_audio to the turn.")
        await self._start_response(time.perf_counter(), e.max_output_tokens, e.output_modalities)

    async def _response_cancel(self, e: p.ResponseCancel) -> None:
        live = self.run is not None and not self.run.finished
        if not live or (e.response_id is not None and e.response_id != self.run.id):
            raise p.ProtocolError("response_cancel_not_active", "Cancellation failed: no active "
                                  "response found" + (f" with id {e.response_id}." if e.response_id else "."),
                                  "response_id" if e.response_id else None)
        await self.run.cancel("client_cancelled")

    async def _item_truncate(self, e: p.ItemTruncate) -> None:
        record = self._items.get(e.item_id)
        if record is None or record.run is None:
            raise p.ProtocolError("item_not_found", f"No assistant item with id '{e.item_id}'.", "item_id")
        if e.content_index != 0:
            raise p.ProtocolError("invalid_value", "content_index must be 0 (one audio part per item).",
                                  "content_index")
        run = record.run
        if not run.finished:
            await run.cancel("client_cancelled")
        if e.audio_end_ms > run.audio_ms:
            raise p.ProtocolError("invalid_value", f"audio_end_ms {e.audio_end_ms} is beyond the "
                                  f"item's audio ({run.audio_ms} ms).", "audio_end_ms")
        await self._truncate(run, e.audio_end_ms)

    async def _start_response(self, started_at: float, max_tokens: Optional[int] = None,
                              modalities: Optional[list[str]] = None) -> None:
        if self.run is not None and not self.run.finished:
            await self.run.cancel("turn_detected")
        if self._run_task is not None and not self._run_task.done():
            # The interrupted answer closes first, so its response.done precedes the next one.
            await asyncio.wait({self._run_task}, timeout=CANCEL_WAIT_S)
        cfg = self.cfg
        request = self._request(self._audio, self._image, self._texts, max_tokens)
        self._audio, self._texts, self._image = [], [], None
        try:
            turn = await self._submit(request)
        except ValueError as exc:
            raise p.ProtocolError("invalid_input", f"The model cannot take this input: {exc}") from None
        except Exception as exc:
            if not is_engine_full(exc):
                raise
            retry = getattr(exc, "retry_after_s", None)
            raise p.ProtocolError("server_busy", f"The model has no room for another answer now ({exc}); "
                                  f"try again in {retry or 1:g} s.", type=p.SERVER_ERROR) from None
        if modalities is not None:
            import dataclasses
            cfg = dataclasses.replace(cfg, output_modalities=tuple(modalities))
        run = ResponseRun(turn=turn, cfg=cfg, outbox=self.outbox, metrics=self.metrics,
                          previous_item_id=self._last_item, started_at=started_at,
                          output_lead_s=self.settings.output_lead_s,
                          on_audio=self.input.note_output, on_speaking=self.input.note_speaking,
                          on_truncated=self._on_truncated)
        self.run = run
        self._remember(run.item_id, ItemRecord("assistant", run))
        carried = self._uncounted_items + [run.item_id]  # the items this engine turn carries
        self._uncounted_items = []
        self._context.append(carried)
        try:
            await run.open()
        except BaseException:
            turn.cancel()
            raise
        self._run_task = asyncio.create_task(self._drive(run, carried), name=f"response {run.id}")

    def _request(self, audio: list[np.ndarray], image: Optional[bytes], texts: list[str],
                 max_tokens: Optional[int] = None) -> TurnRequest:
        cfg = self.cfg
        limit = max_tokens or cfg.max_output_tokens or self.settings.max_steps
        return TurnRequest(
            session_id=self.engine_session,
            audio_16k=np.concatenate(audio) if audio else None,
            image=image, text="\n".join(texts) if texts else None,
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
        image = self._frame if self._frame is not None else self._image
        request = self._request(self._audio + [audio], image, self._texts)
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
        # Its admission may have truncated the context: read its events to hear of that.
        task = asyncio.create_task(self._drain(spec.turn))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, turn) -> None:
        async for event in turn:
            if isinstance(event, ContextTruncated):
                await self._on_truncated(event)

    # ---- context window -------------------------------------------------------------------------
    async def _on_truncated(self, e: ContextTruncated) -> None:
        """The engine forgot this session's oldest turns: say which items went."""
        gone: list[str] = []
        for _ in range(min(e.dropped_turns, len(self._context))):
            gone += self._context.popleft()
        self.metrics.truncations_total.inc()
        log.info("session %s: context full, %d positions (%d turns) forgotten", self.id,
                 e.dropped_positions, e.dropped_turns)
        if not self.closed:
            await self.outbox.put(ev.context_truncated(gone, e.dropped_positions))

    def _forget_context(self, items: list[str]) -> None:
        try:
            self._context.remove(items)
        except ValueError:
            pass

    async def _drive(self, run: ResponseRun, carried: list[str]) -> None:
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
                self._forget_context(carried)  # the engine never took this turn in
            await run.close(done, error)
        except SlowReader as exc:
            run.turn.cancel()
            if self._on_fatal is not None:
                await self._on_fatal(str(exc))
