"""Out-of-band responses (response.create with conversation "none" or its own input), for a
RealtimeSession (mixed into it).

conversation "none" without input: the answer sees the conversation as it is (user items
still waiting included, and left waiting) and is forgotten by the model once done
(TurnRequest keep=False); its items never enter the conversation.

With `input`: the answer sees only those items, as OpenAI's "new context for this response".
Such a context cannot share the session's KV cache, so it is built in a second engine
session opened for this response and closed when it ends (no free slot: server_busy).
Input items are messages (user content, assistant or system text) or references to items
of the conversation, which contribute their text (transcripts for audio).
"""
from __future__ import annotations

import asyncio
import time

from omni2.streaming.engine.messages import TurnRequest

from . import protocol as p
from .conversation import Pending
from .session_items import engine_refusal


def item_text(wire: dict) -> str:
    """The words of a realtime.item: its text parts and transcripts."""
    words = [part.get("text") or part.get("transcript") or "" for part in wire.get("content", [])]
    return "\n".join(w for w in words if w)


class OutOfBand:
    """Needs from the session: conversation, engine, _request(), _launch(), _user_content(),
    _existing(), _track()."""

    async def _respond_out_of_band(self, e: p.ResponseCreate) -> None:
        started = time.perf_counter()
        if e.input is None:
            pend = self.conversation.peek_pending()
            request = self._request(pend.audio, pend.image if pend.audio else None, pend.texts,
                                    e.max_output_tokens)
            request.keep = False
            await self._launch(request, started, e.output_modalities, e.metadata, in_conversation=False)
            return
        try:
            session_id = await asyncio.to_thread(self.engine.open_session)
        except Exception as exc:
            raise (engine_refusal(exc) or exc) from None
        try:
            request = await self._context_of(session_id, e.input, e.max_output_tokens)
            await self._launch(request, started, e.output_modalities, e.metadata, in_conversation=False)
        except BaseException:
            self.engine.close_session(session_id)  # _launch did not get to own it
            raise

    async def _context_of(self, session_id: str, items: list[p.NewItem], max_tokens) -> TurnRequest:
        """Submit `items` to engine session `session_id` as its context; returns the question
        (the user content after the last assistant/system item, or the minimal one)."""
        pending = Pending()
        for item in items:
            role, text = item.role, item.text
            if role == "reference":
                ref = self._existing(item.reference)
                role, text = ref.role, item_text(ref.to_wire())
            if role == "user":
                if item.role == "user":
                    got, _ = await self._user_content(item.parts)
                    pending.texts += got.texts
                    pending.audio += got.audio
                    pending.image = got.image or pending.image
                elif text:
                    pending.texts.append(text)
                continue
            if pending.texts or pending.audio:
                self._submit_context(self._isolated(session_id, pending, None, answer=False))
                pending = Pending()
            if text:
                self._submit_context(TurnRequest(session_id, text=text, role=role, answer=False))
        return self._isolated(session_id, pending, max_tokens)

    def _isolated(self, session_id: str, pend: Pending, max_tokens, answer: bool = True) -> TurnRequest:
        request = self._request(pend.audio, pend.image if pend.audio else None, pend.texts, max_tokens)
        request.session_id, request.answer = session_id, answer
        return request

    def _submit_context(self, request: TurnRequest) -> None:
        """A context turn of the private session: nobody needs its events, only its place."""
        try:
            turn = self.engine.submit(request)
        except Exception as exc:
            raise (engine_refusal(exc) or exc) from None
        self._track(turn, own_context=False)
