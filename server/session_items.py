"""conversation.item.create / retrieve / delete for a RealtimeSession (mixed into it).

User items wait for a response (they become its question). An assistant or system item joins
the model's context at once as a context-only engine turn: what the assistant said (its text),
or system text the model reads without answering (Mini-Omni2 has no system role: it reads it
as typed text). User items waiting before it go in first, as a question nobody answered yet,
so the model's context keeps the conversation's order. Deleting an item removes it from the
model's context too (engine.forget: later turns are re-prefilled without it).
"""
from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np

from omni2.streaming.audio import decode_input_audio, resample
from omni2.streaming.engine.messages import ContextTruncated, EngineFull, TurnDone, TurnRequest

from . import events as ev
from . import protocol as p
from .conversation import Item, Pending
from .input_audio import RATE


def is_engine_full(exc: BaseException) -> bool:
    """The engine has no room for it now (EngineFull, or EngineBusy for lack of headroom)."""
    return isinstance(exc, EngineFull)


def engine_refusal(exc: Exception) -> Optional[p.ProtocolError]:
    """The error event for an engine that refused a turn (None: not a refusal, re-raise)."""
    if isinstance(exc, ValueError):
        return p.ProtocolError("invalid_input", f"The model cannot take this input: {exc}")
    if is_engine_full(exc):  # (EngineBusy, for lack of step-time headroom, says when to retry)
        retry = exc.retry_after_s
        return p.ProtocolError("server_busy", f"The model has no room for another answer now ({exc}); "
                               f"try again in {retry or 1:g} s.", type=p.SERVER_ERROR)
    return None


class ItemEvents:
    """Needs from the session: conversation, engine, engine_session, cfg, settings, outbox,
    _request(), _drop_speculation(), _track(), _frame."""

    async def _item_create(self, e: p.ItemCreate) -> None:
        self.conversation.check_new(e.item_id, e.previous_item_id)
        item_id = e.item_id or ev.new_id("item")
        if e.item.role == "user":
            pending, content = await self._user_content(e.parts)
            await self._add_user_item(item_id, content, pending)
            return
        if e.item.role == "assistant":
            content = [{"type": "output_audio", "transcript": part.text} if part.wire_type in ("output_audio", "audio")
                       else {"type": "output_text", "text": part.text} for part in e.parts]
        else:
            content = [{"type": "input_text", "text": part.text} for part in e.parts]
        await self._add_context_item(item_id, e.item.role, e.item.text, content)

    async def _user_content(self, parts: list[p.UserPart]) -> tuple[Pending, list[dict]]:
        pending, content = Pending(), []
        for part in parts:
            if part.kind == "text":
                pending.texts.append(part.text)
                content.append({"type": "input_text", "text": part.text})
            elif part.kind == "audio":
                pending.audio.append(await asyncio.to_thread(self._decode_item_audio, part))
                content.append({"type": "input_audio", "transcript": None})
            else:
                await asyncio.to_thread(p.verify_image, part.data, self.settings.max_image_pixels, part.param)
                pending.image = part.data
                content.append({"type": "input_image", "image_url": None, "detail": "auto"})
        waiting = self.conversation.peek_pending()
        if len(waiting.texts) + len(pending.texts) > self.settings.max_pending_texts:
            raise p.ProtocolError("too_many_items", f"More than {self.settings.max_pending_texts} text "
                                  "parts wait for a response; send response.create.", "item.content")
        if sum(a.size for a in waiting.audio + pending.audio) > self.settings.max_turn_audio_s * RATE:
            raise p.ProtocolError("input_audio_buffer_full", "Audio waiting for a response exceeds "
                                  f"{self.settings.max_turn_audio_s:g} s.", "item.content")
        return pending, content

    def _decode_item_audio(self, part: p.UserPart) -> np.ndarray:
        try:
            x, sr = decode_input_audio(part.data, self.cfg.input_format)
        except ValueError as exc:
            raise p.ProtocolError("invalid_audio", f"Audio cannot be decoded: {exc}.", part.param) from None
        return resample(x, sr, RATE) if sr != RATE else x

    async def _add_user_item(self, item_id: str, content: list[dict], pending: Pending) -> None:
        previous = self.conversation.last_id
        item = Item(item_id, "user", wire=ev.user_item(item_id, content), pending=pending)
        self.conversation.add(item)
        await self.outbox.put(ev.item_added(item.wire, previous))
        await self.outbox.put(ev.item_done(item.wire, previous))

    async def _add_context_item(self, item_id: str, role: str, text: str, content: list[dict]) -> None:
        previous = self.conversation.last_id
        await self._flush_pending()
        item = Item(item_id, role, wire=ev.user_item(item_id, content, role), part="all")
        self.conversation.add(item)
        if text:  # an assistant item of audio alone (no transcript) has nothing for the model
            await self._context_turn(TurnRequest(self.engine_session, text=text, role=role, answer=False),
                                     [item_id], "all")
        await self.outbox.put(ev.item_added(item.wire, previous))
        await self.outbox.put(ev.item_done(item.wire, previous))

    async def _flush_pending(self) -> None:
        """User items still waiting join the context now, as a question not answered yet."""
        if not self.conversation.pending():
            return
        ids, pend = self.conversation.take_pending()
        request = self._request(pend.audio, pend.image if pend.audio else None, pend.texts)
        request.answer = False
        await self._context_turn(request, ids, "prompt")

    async def _context_turn(self, request: TurnRequest, item_ids: list[str], part: str) -> None:
        self._drop_speculation()
        try:
            turn = await asyncio.to_thread(self.engine.submit, request)
        except Exception as exc:
            refusal = engine_refusal(exc)
            if refusal is None:
                raise
            raise refusal from None
        self.conversation.carry(turn.id, item_ids, part)
        self._track(turn)

    def _track(self, turn, own_context: bool = True) -> None:
        """Read a turn nobody relays (context only, a discarded speculation) to its end; what
        it says about the context matters only for the session's own engine context."""
        task = asyncio.create_task(self._drain(turn, own_context))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, turn, own_context: bool = True) -> None:
        async for event in turn:
            if not own_context:
                continue
            if isinstance(event, ContextTruncated):
                await self._on_truncated(event)
            elif isinstance(event, TurnDone) and "context_start" not in event.stats:
                self.conversation.never_taken(turn.id)

    async def _item_retrieve(self, e: p.ItemRetrieve) -> None:
        item = self._existing(e.item_id)
        await self.outbox.put(ev.item_retrieved(item.to_wire()))

    async def _item_delete(self, e: p.ItemDelete) -> None:
        item = self._existing(e.item_id)
        if item.run is not None and not item.run.finished:
            await item.run.cancel("client_cancelled")
        self._drop_speculation()  # a held question was prefilled on top of the item (or holds it)
        _, edit = self.conversation.delete(e.item_id)
        if edit is not None:
            self.engine.forget(self.engine_session, *edit)
        await self.outbox.put(ev.item_deleted(e.item_id))

    def _existing(self, item_id: str) -> Item:
        item = self.conversation.get(item_id)
        if item is None:
            raise p.ProtocolError("item_not_found", f"Item with item_id '{item_id}' not found.", "item_id")
        return item
