"""The conversation as the client sees it, and where each item sits in the model's context.

Items are kept in order (the newest `limit`; older ones can no longer be named by id). Each
knows its wire form, for conversation.item.retrieve, and the engine turn that carries it into
the model: a user item is part of a turn's prompt, an answer is the turn's answer, an
assistant or system item created by the client is a context-only turn of its own. User items
wait in `pending` until a response (or a following assistant/system item) takes them in.

Deleting an item tells the caller what to remove from the engine's context: the item's part
of its turn, or the whole turn when nothing else in the conversation rides on it. One turn's
prompt holds all the user items it took (e.g. speech and a camera image): deleting one of them
takes the prompt out, so the others leave the model's context with it (they stay listed).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .protocol import ProtocolError

ROOT = "root"   # previous_item_id of the first item


@dataclass
class Pending:
    """A user item's content that no engine turn has taken yet."""

    texts: list[str] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)   # 16 kHz float32
    image: Optional[bytes] = None


@dataclass
class Item:
    id: str
    role: str                           # user | assistant | system
    wire: Optional[dict] = None         # the realtime.item (answers: built by their run)
    run: object = None                  # ResponseRun of an answer
    pending: Optional[Pending] = None   # user content waiting for a turn
    turn_id: Optional[int] = None       # engine turn carrying it into the model's context
    part: str = "prompt"                # its part of that turn: prompt | answer | all

    def to_wire(self) -> dict:
        if self.run is not None:
            return self.run.item_wire()
        return self.wire


class Conversation:
    def __init__(self, limit: int):
        self.limit = limit
        self._items: collections.OrderedDict[str, Item] = collections.OrderedDict()
        self.turns: collections.deque[int] = collections.deque()   # engine turns in context, oldest first

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    @property
    def last_id(self) -> Optional[str]:
        return next(reversed(self._items), None)

    def get(self, item_id: str) -> Optional[Item]:
        return self._items.get(item_id)

    def check_new(self, item_id: Optional[str], previous_item_id: Optional[str]) -> None:
        """A client item may only go at the end: after the last item, or at the root of an
        empty conversation (the model's context is built in order)."""
        if item_id is not None and item_id in self._items:
            raise ProtocolError("invalid_value", f"An item with id '{item_id}' already exists.", "item.id")
        if previous_item_id is None or previous_item_id == self.last_id:
            return
        if previous_item_id == ROOT and not self._items:
            return
        raise ProtocolError("invalid_value", "Items can only be appended at the end of the "
                            f"conversation (previous_item_id must be '{self.last_id or ROOT}').",
                            "previous_item_id")

    def add(self, item: Item) -> None:
        self._items[item.id] = item
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    # ---- pending user content ------------------------------------------------------------
    def pending(self) -> list[Item]:
        return [i for i in self._items.values() if i.pending is not None]

    def peek_pending(self) -> Pending:
        """The pending items' content merged (one question); the latest image wins."""
        merged = Pending()
        for item in self.pending():
            merged.texts += item.pending.texts
            merged.audio += item.pending.audio
            merged.image = item.pending.image or merged.image
        return merged

    def take_pending(self) -> tuple[list[str], Pending]:
        """The pending items' ids and merged content, now taken by a turn."""
        merged, items = self.peek_pending(), self.pending()
        for item in items:
            item.pending = None
        return [i.id for i in items], merged

    # ---- the model's context ---------------------------------------------------------------
    def carry(self, turn_id: int, item_ids: list[str], part: str) -> None:
        """Engine turn `turn_id` carries these items (as its `part`)."""
        for item_id in item_ids:
            item = self._items.get(item_id)
            if item is not None:
                item.turn_id, item.part = turn_id, part
        if turn_id not in self.turns:
            self.turns.append(turn_id)

    def riders(self, turn_id: int) -> list[Item]:
        return [i for i in self._items.values() if i.turn_id == turn_id]

    def never_taken(self, turn_id: int) -> None:
        """The engine did not take this turn in (cancelled or refused before admission)."""
        for item in self.riders(turn_id):
            item.turn_id = None
        try:
            self.turns.remove(turn_id)
        except ValueError:
            pass

    def drop_oldest(self, n: int) -> list[str]:
        """The engine forgot its `n` oldest turns: ids of the items they carried."""
        gone: list[str] = []
        for _ in range(min(n, len(self.turns))):
            turn_id = self.turns.popleft()
            for item in self.riders(turn_id):
                item.turn_id = None
                gone.append(item.id)
        return gone

    def delete(self, item_id: str) -> tuple[Item, Optional[tuple[int, str]]]:
        """Remove an item; returns it and what leaves the engine's context: (turn id, part)."""
        item = self._items.pop(item_id)
        turn_id, part = item.turn_id, item.part
        if turn_id is None:
            return item, None
        item.turn_id = None
        left = self.riders(turn_id)
        if part == "prompt":  # the prompt goes whole: its other user items go with it
            for other in [i for i in left if i.part == "prompt"]:
                other.turn_id = None
            left = [i for i in left if i.part != "prompt"]
        if not left:
            self.never_taken(turn_id)
            return item, (turn_id, "all")
        return item, (turn_id, part)
