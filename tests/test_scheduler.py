"""The engine's scheduling rules with no model: a fake executor stands in for the model's side of
each step (streaming/engine/executor.py) and says, per session, what the "model" answers.

One test per rule: admission (slots, queue), cancel, barge-in, prefill chunks between decode
steps, slot reuse and context kept across turns, and the three ends of an answer."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omni2.model import tokens as tk
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.host import HostPolicy
from omni2.streaming.engine.messages import EngineFull, TextDelta, TurnDone, TurnRequest
from omni2.streaming.engine.slots import IDLE_IDS

INTERRUPT = 4242  # a text id the fake model's config lists as an interrupt token
SAYING = 100      # what the fake model writes otherwise


class FakeTokenizer:
    def incremental(self):
        return SimpleNamespace(push=lambda token: f"<{token}>", flush=lambda: "")

    def decode_answer(self, ids) -> str:
        return " ".join(map(str, ids))


class FakeExecutor:
    """Prompts are as many positions as the question has samples; each session's answer ends
    as `ends` says (step -> "eoa" | "interrupt"); every call is logged in order."""

    def __init__(self, context_len: int = 4096) -> None:
        self.model = SimpleNamespace(name="fake")
        self.host = HostPolicy()
        self.context_len = context_len
        self.cache = None
        self.snac = None  # tokens only: the vocoder passes the turn's end through
        self.interrupt_ids = (INTERRUPT,)
        self.tokenizer = FakeTokenizer()
        self.ends: dict[str, tuple[int, str]] = {}  # session id -> (step, how)
        self.log: list[tuple] = []

    def encode(self, requests: list[TurnRequest]) -> list:
        self.log.append(("encode", len(requests)))
        return [torch.zeros(2, len(req.audio_16k), 1) for req in requests]

    def set_sampling(self, index, sampling) -> None:
        self.log.append(("sampling", index, sampling.temperature))

    def make_room(self, slot, need: int) -> int:
        return 0

    def forget(self, slot, turn_id, part, keep_steps):
        return None

    def prefill(self, chunks: list) -> list:
        for slot, a, b in chunks:
            self.log.append(("prefill", slot.index, slot.start + a, slot.start + b))
        self.log.append(("prefill step", len(chunks)))
        return [torch.zeros(2, 1, 1) for _ in chunks]

    def decode(self, ids: list, pos: list, span: int):
        self.log.append(("decode", len(ids) // 2))
        return None

    def sample(self, hidden, slots) -> tuple[list, list]:
        audio, text = [], []
        for s in slots:
            step, how = self.ends.get(s.session, (None, None))
            ending = s.turn is not None and s.step == step
            a = [0] * tk.N_AUDIO_LAYERS
            if ending and how == "eoa":
                a[-1] = tk.EOA
            audio.append(a)
            text.append(INTERRUPT if ending and how == "interrupt" else SAYING)
        return audio, text


def question(positions: int) -> np.ndarray:
    return np.zeros(positions, np.float32)


def done_of(turn, timeout: float = 30) -> TurnDone:
    return [ev for ev in turn.events(timeout=timeout) if isinstance(ev, TurnDone)][0]


@pytest.fixture
def fake():
    return FakeExecutor()


def engine(fake, **config) -> Engine:
    config.setdefault("step_budget_share", 0)
    return Engine(None, EngineConfig(**config), executor=fake)


def test_admission_gives_each_session_a_slot_and_bounds_the_waiting_turns(fake):
    eng = engine(fake, max_sessions=2, max_queued_turns=2)  # not started: submitted turns wait
    a, b = eng.open_session(), eng.open_session()
    with pytest.raises(EngineFull, match="slots"):
        eng.open_session()
    eng.submit(TurnRequest(session_id=a, audio_16k=question(3)))
    eng.submit(TurnRequest(session_id=b, audio_16k=question(3)))
    with pytest.raises(EngineFull, match="waiting"):
        eng.submit(TurnRequest(session_id=a, audio_16k=question(3)))
    assert eng.stats()["queued_turns"] == 2 and eng.stats()["free_slots"] == 0


def test_a_cancel_ends_the_answer_at_a_step_boundary_and_the_session_answers_again(fake):
    with engine(fake, max_sessions=1, max_steps=10_000) as eng:
        sid = eng.open_session()
        turn = eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=10_000))
        events = turn.events(timeout=30)
        assert isinstance(next(events), TextDelta)  # speaking
        turn.cancel()
        done = [ev for ev in events if isinstance(ev, TurnDone)][0]
        assert done.reason == "cancelled" and 0 < done.stats["steps"] < 10_000
        fake.ends[sid] = (2, "eoa")
        assert done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(3)))).reason == "completed"
        assert eng.stats()["live_turns"] == 0 and eng.stats()["cancels_total"] == 1


def test_a_new_question_replaces_the_live_answer(fake):
    with engine(fake, max_sessions=1, max_steps=10_000) as eng:
        sid = eng.open_session()
        first = eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=10_000))
        events = first.events(timeout=30)
        # two words out: its step 1 is past, so the end set for the next answer cannot end it
        assert isinstance(next(events), TextDelta) and isinstance(next(events), TextDelta)
        fake.ends[sid] = (1, "eoa")
        second = eng.submit(TurnRequest(session_id=sid, audio_16k=question(3)))
        assert done_of(first).reason == "cancelled" and done_of(second).reason == "completed"


def test_a_long_prompt_is_prefilled_in_chunks_between_the_decode_steps_of_live_answers(fake):
    with engine(fake, max_sessions=2, prefill_chunk=4, max_steps=10_000) as eng:
        talking, asking = eng.open_session(), eng.open_session()
        live = eng.submit(TurnRequest(session_id=talking, audio_16k=question(2), max_steps=10_000))
        assert isinstance(next(live.events(timeout=30)), TextDelta)
        fake.ends[asking] = (1, "eoa")
        assert done_of(eng.submit(TurnRequest(session_id=asking, audio_16k=question(10)))).reason == "completed"
        live.cancel()
        done_of(live)
    chunks = [i for i, e in enumerate(fake.log) if e[0] == "prefill" and e[1] == 1]
    assert [fake.log[i][2:] for i in chunks] == [(0, 4), (4, 8), (8, 10)]  # prefill_chunk positions each
    # one chunk a loop, and between two chunks the live answer took its decode step
    assert all(("decode", 1) in fake.log[i + 1: j] for i, j in zip(chunks, chunks[1:]))


def test_a_closed_sessions_slot_is_reused_and_a_session_keeps_its_context_across_turns(fake):
    with engine(fake, max_sessions=1) as eng:
        sid = eng.open_session()
        fake.ends[sid] = (3, "eoa")
        first = done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(5))))
        done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(2))))
        # the second prompt starts after the first turn's prompt and the steps it wrote
        assert [e[2] for e in fake.log if e[0] == "prefill"] == [0, 5 + first.stats["steps"]]
        eng.close_session(sid)  # the slot is let go at the next step boundary
        deadline = time.monotonic() + 30
        while eng.stats()["free_slots"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.log.clear()
        again = eng.open_session()
        assert again != sid
        fake.ends[again] = (1, "eoa")
        done_of(eng.submit(TurnRequest(session_id=again, audio_16k=question(4))))
        assert [e[2:] for e in fake.log if e[0] == "prefill"] == [(0, 4)]  # a fresh context in slot 0


@pytest.mark.parametrize("how, reason", [("eoa", "completed"), ("interrupt", "interrupted")])
def test_an_answer_ends_when_the_model_says_so(fake, how, reason):
    with engine(fake, max_sessions=1) as eng:
        sid = eng.open_session()
        fake.ends[sid] = (5, how)
        done = done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=50)))
    assert done.reason == reason and done.stats["steps"] == 5


def test_an_answer_ends_at_its_max_steps_capped_by_the_engines(fake):
    with engine(fake, max_sessions=1, max_steps=7) as eng:
        sid = eng.open_session()
        assert done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=9))).stats["steps"] == 7
        done = done_of(eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=4)))
    assert done.reason == "max_steps" and done.stats["steps"] == 4


# ---- arriving turns worked on together (streaming/engine/prefill.py) ---------------------------
def _asked_together(fake, n: int, positions: int, **config):
    """n sessions ask at once (submitted before the engine starts); every answer is one step."""
    eng = engine(fake, max_sessions=n, **config)
    sids = [eng.open_session() for _ in range(n)]
    for sid in sids:
        fake.ends[sid] = (1, "eoa")
    turns = [eng.submit(TurnRequest(session_id=sid, audio_16k=question(positions))) for sid in sids]
    with eng:
        assert all(done_of(t).reason == "completed" for t in turns)
    return [e for e in fake.log if e[0] in ("encode", "prefill step")]


def test_the_questions_waiting_are_encoded_as_one_batch_and_their_prompts_share_prefill_steps(fake):
    calls = _asked_together(fake, 3, 10, prefill_chunk=4)
    assert calls[0] == ("encode", 3)                                         # one encoder batch
    assert [c for c in calls if c[0] == "prefill step"] == [("prefill step", 3)] * 3   # 4 + 4 + 2 positions
    assert sorted(e[2:] for e in fake.log if e[0] == "prefill" and e[1] == 2) == [(0, 4), (4, 8), (8, 10)]


def test_the_one_at_a_time_baseline_stays_reachable(fake):
    calls = _asked_together(fake, 3, 10, prefill_chunk=4, batched_arrivals=False)
    assert [c for c in calls if c[0] == "encode"] == [("encode", 1)] * 3
    assert [c for c in calls if c[0] == "prefill step"] == [("prefill step", 1)] * 9


class TimedExecutor(FakeExecutor):
    """A decode step costs DECODE_S, a prefill call PER_POSITION_S a computed position."""

    DECODE_S, PER_POSITION_S = 0.040, 0.0002

    def prefill(self, chunks: list) -> list:
        time.sleep(self.PER_POSITION_S * 2 * len(chunks) * max(b - a for _, a, b in chunks) / 2)
        return super().prefill(chunks)

    def decode(self, ids, pos, span):
        time.sleep(self.DECODE_S)
        return super().decode(ids, pos, span)


def test_while_answers_play_a_steps_prefill_is_bounded_by_the_frame_the_decode_step_leaves():
    """68 ms of budget - 40 ms of decode leaves 28 ms: ~140 positions at 0.2 ms each (a loaded
    machine only makes the measured costs larger: fewer positions, never more)."""
    fake = TimedExecutor()
    with engine(fake, max_sessions=3, step_budget_share=0.8, prefill_chunk=512, max_steps=10_000) as eng:
        talking, a, b = eng.open_session(), eng.open_session(), eng.open_session()
        live = eng.submit(TurnRequest(session_id=talking, audio_16k=question(300), max_steps=10_000))
        assert isinstance(next(live.events(timeout=30)), TextDelta)            # speaking
        for sid in (a, b):
            fake.ends[sid] = (1, "eoa")
        asked = [eng.submit(TurnRequest(session_id=sid, audio_16k=question(1200))) for sid in (a, b)]
        assert all(done_of(t).reason == "completed" for t in asked)
        live.cancel()
        done_of(live)
    first = [e for e in fake.log if e[0] == "prefill" and e[1] == 0]
    assert first == [("prefill", 0, 0, 300)]        # nothing playing: the whole prompt in one step
    steps, finishing, i = [], [], 0
    log = fake.log[fake.log.index(first[0]) + 1:]
    while i < len(log):                               # positions computed per prefill step after it
        if log[i][0] == "prefill":
            chunk = [e for e in log[i:] if e[0] == "prefill"][:log[i:].index(next(e for e in log[i:] if e[0] == "prefill step"))]
            steps.append(len(chunk) * max(e[3] - e[2] for e in chunk))
            finishing.append(all(e[3] == 1200 for e in chunk))  # only prompts' last pieces
            i += len(chunk)
        i += 1
    assert steps and max(steps) <= 160 and sum(steps) >= 2 * 1200, steps    # never the 512 unbounded
    # every step advances the questions by prefill_min_positions, or finishes what a prompt has left
    # (when the budget admits one prompt a step, the older one's last piece can be shorter)
    assert min(n for n, last in zip(steps, finishing) if not last) >= 32, (steps, finishing)


class CostedExecutor(FakeExecutor):
    """A decode step costs FIXED_S plus PER_ANSWER_S for each answer in it."""

    def __init__(self, fixed_s: float, per_answer_s: float) -> None:
        super().__init__()
        self.fixed_s, self.per_answer_s = fixed_s, per_answer_s

    def decode(self, ids, pos, span):
        answers = sum(row != IDLE_IDS[0] for row in ids[0::2])
        time.sleep(self.fixed_s + self.per_answer_s * answers)
        return super().decode(ids, pos, span)


@pytest.mark.parametrize("fixed_s, per_answer_s, admitted", [(0.045, 0.001, 3), (0.005, 0.025, 2)])
def test_admission_fits_a_fixed_and_a_per_answer_step_cost(fixed_s, per_answer_s, admitted):
    """45 ms + 1 ms an answer: linear scaling of the first step would refuse the second answer
    (90 ms), the fit admits three (48 ms). 5 ms + 25 ms an answer: the third (80 ms) is refused."""
    from omni2.streaming.engine.messages import EngineBusy

    fake = CostedExecutor(fixed_s, per_answer_s)
    with engine(fake, max_sessions=3, step_budget_share=0.8, max_steps=10_000) as eng:
        eng.warmup(seconds=0.001, steps=8)        # one and two answers a step: the fit starts with both
        turns, refused = [], 0
        for sid in [eng.open_session() for _ in range(3)]:
            try:
                turns.append(eng.submit(TurnRequest(session_id=sid, audio_16k=question(3), max_steps=10_000)))
            except EngineBusy:
                refused += 1
            time.sleep(0.5)                       # steps with the answers admitted so far are measured
        for t in turns:
            t.cancel()
            done_of(t)
    assert (len(turns), refused) == (admitted, 3 - admitted)


def test_questions_go_one_at_a_time_once_the_encoder_is_seen_to_gain_nothing_from_a_batch(fake):
    """The fake encoder costs 30 ms a question and nothing a call: after the first calls (one
    batch of three, then single questions) the questions that wait together go one at a time."""
    encode = fake.encode

    def timed(requests):
        time.sleep(0.030 * len(requests))
        return encode(requests)

    fake.encode = timed
    with engine(fake, max_sessions=4) as eng:
        sids = [eng.open_session() for _ in range(4)]
        for sid in sids:
            fake.ends[sid] = (1, "eoa")
        for rnd in range(4):
            turns = [eng.submit(TurnRequest(session_id=sid, audio_16k=question(3 + rnd))) for sid in sids]
            assert all(done_of(t).reason == "completed" for t in turns)
    sizes = [e[1] for e in fake.log if e[0] == "encode"]
    assert max(sizes) > 1 and sizes[-4:] == [1, 1, 1, 1], sizes
