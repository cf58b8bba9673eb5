"""Overload control: admission on measured step-time headroom (streaming/engine/admission.py).

The policy alone (step times in, decisions out), then the engine on the tiny model with a
decode step slowed to cost 25 ms an answer (and measured at that cost, whatever else loads the
CPU), driven past what fits an 85 ms frame: the answers admitted keep every step within the
budget and the extra turns are refused, not slowed.
"""
import time

import numpy as np
import pytest

from omni2.streaming.engine.admission import FRAME_S, Decision, StepHeadroom
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.engine.engine import Engine, EngineBusy, EngineFull
from omni2.streaming.engine.messages import TurnRequest


def test_nothing_measured_admits_and_the_only_answer_always_goes():
    h = StepHeadroom(share=0.8)
    assert h.decide(live=5, after=6).admit                   # nothing known yet
    h.observe(0.5, 1, at=0.0)                                # far over budget with one answer
    assert h.decide(live=0, after=1).admit                   # refusing the only answer helps no one
    assert h.decide(live=3, after=3).admit                   # a replacement adds no load
    assert not h.decide(live=1, after=2).admit
    assert h.overloaded(live=1) and not h.overloaded(live=0)


def test_until_two_batch_sizes_were_seen_each_step_scales_linearly():
    h = StepHeadroom(share=0.8, retry_after_s=2.0)
    for i in range(20):
        h.observe(0.030, 2, at=0.04 * i)                     # 15 ms an answer, as far as is known
    assert h.predict(2) == pytest.approx(0.030)
    assert h.predict(4) == pytest.approx(0.060)              # scaled linearly to 4 answers
    assert h.decide(live=3, after=4).admit                   # 60 ms <= 68 ms
    refused = h.decide(live=4, after=5)                      # 75 ms > 68 ms
    assert not refused.admit and refused.retry_after_s == 2.0
    assert refused.budget_s == pytest.approx(0.8 * FRAME_S)
    assert "Try again in 2 s" in refused.reason()
    assert not h.overloaded(live=2)


def _seen(h, fixed_s: float, per_answer_s: float, sizes=(1, 2)):
    at = 0.0
    for _ in range(20):
        for n in sizes:
            at += 0.05
            h.observe(fixed_s + per_answer_s * n, n, at=at)


def test_a_slow_fixed_cost_does_not_refuse_answers_that_cost_little():
    h = StepHeadroom(share=0.8)
    _seen(h, fixed_s=0.045, per_answer_s=0.001)              # 46 ms alone: linear scaling says 92 with two
    assert h.cost.per_unit() == pytest.approx(0.001)
    assert h.predict(2) == pytest.approx(0.047) and h.decide(live=1, after=2).admit
    assert h.predict(16) == pytest.approx(0.061) and h.decide(live=15, after=16).admit
    assert not h.decide(live=23, after=24).admit             # 69 ms: the budget still holds


def test_a_large_per_answer_cost_still_refuses():
    h = StepHeadroom(share=0.8)
    _seen(h, fixed_s=0.005, per_answer_s=0.025)
    assert h.cost.per_unit() == pytest.approx(0.025)
    assert h.decide(live=1, after=2).admit                   # 55 ms
    assert not h.decide(live=2, after=3).admit               # 80 ms > 68 ms
    assert h.overloaded(live=3) and not h.overloaded(live=2)


def test_slow_calls_at_one_size_never_make_a_unit_cost_more_than_a_whole_call():
    """A cold start: the first steps with two answers took 150 ms; later ones with one 8 ms.
    The unbounded slope (142 ms an answer) would refuse every second answer, forever: no step
    with two would ever be measured again. Bounded by 8 ms / 1 answer, the second is admitted."""
    h = StepHeadroom(share=0.8)
    for i in range(4):
        h.observe(0.150, 2, at=0.01 * i)
    for i in range(30):
        h.observe(0.008, 1, at=1 + 0.01 * i)
    assert h.cost.per_unit() == pytest.approx(0.008)
    assert h.predict(2) == pytest.approx(0.016) and h.decide(live=1, after=2).admit


def test_the_fit_is_off_for_the_one_at_a_time_baseline():
    h = StepHeadroom(share=0.8, fit=False)
    _seen(h, fixed_s=0.045, per_answer_s=0.001)
    assert h.cost.per_unit() is None and not h.decide(live=1, after=2).admit


def test_spikes_do_not_refuse_steps_over_budget_half_the_time_do_and_old_steps_age_out():
    h = StepHeadroom(share=0.8, window_s=1.0, min_steps=4)
    clock = iter(0.1 * i for i in range(100))
    for t in [0.02] * 8 + [0.5, 0.5]:                        # two steps met an encoder
        h.observe(t, 3, at=next(clock))
    assert h.decide(live=3, after=4).admit
    for t in [0.02] * 4 + [0.09] * 6:                        # most steps of the last second miss the budget
        h.observe(t, 3, at=next(clock))
    assert not h.decide(live=3, after=4).admit and h.overloaded(live=3)
    for _ in range(11):                                      # a second later they have aged out
        h.observe(0.02, 3, at=next(clock))
    assert h.decide(live=3, after=4).admit


def test_a_few_steps_are_kept_however_old():
    h = StepHeadroom(share=0.8, window_s=1.0, min_steps=3)
    for at in (0.0, 10.0, 20.0):
        h.observe(0.2, 2, at=at)
    assert h.predict(2) == pytest.approx(0.2)


class SlowStepEngine(Engine):
    """The tiny model's decode step, slowed to cost PER_ANSWER_S for each answer in it, and
    measured by admission as exactly FIXED_S + PER_ANSWER_S an answer on a clock of its own:
    the policy's decisions then follow the step cost, not the load other processes put on a
    shared CPU (the wall time of the tiny step itself varies 5-30 ms there)."""

    FIXED_S, PER_ANSWER_S = 0.005, 0.025

    def _decode_step(self, speaking) -> None:
        self._answers = len(speaking)
        super()._decode_step(speaking)

    def start(self):
        forward = self.executor.forward

        def slow(*args):  # inside the timed step: the answers' real time grows with them
            time.sleep(self.PER_ANSWER_S * self._answers)
            return forward(*args)

        self.executor.forward = slow
        if self.headroom is not None:
            self.headroom.observe = _at_stated_cost(self.headroom.observe, self.FIXED_S, self.PER_ANSWER_S)
        return super().start()


def _at_stated_cost(observe, fixed_s: float, per_unit_s: float):
    """`observe(seconds, units, at)` fed fixed_s + per_unit_s x units on a clock of its own,
    whatever was measured: admission's decisions then follow the stated cost."""
    clock = [0.0]

    def costed(seconds, units, at):
        cost = fixed_s + per_unit_s * units
        clock[0] += cost
        observe(cost, units, clock[0])

    return costed


def _wait_for_steps(eng, answers: int, count: int = 20, timeout_s: float = 30.0) -> None:
    """Until `count` decode steps with `answers` answers were measured (the decision on the next
    question then sees the load it adds to)."""
    deadline = time.monotonic() + timeout_s
    while sum(k == answers for k in list(eng.step_sessions)) < count:
        assert time.monotonic() < deadline, f"no {count} steps with {answers} answers in {timeout_s} s"
        time.sleep(0.02)


def _drive_past_capacity(model, share: float):
    """Eight sessions ask one by one, each once the steps with the answers admitted so far were
    measured, on a step costing 5 ms + 25 ms an answer; returns (answers admitted, refusals,
    answers of each step, the predicted step time of each refusal)."""
    cfg = EngineConfig(max_sessions=8, max_steps=400, step_budget_share=share, busy_retry_after_s=0.5)
    audio = (0.1 * np.random.RandomState(0).randn(8000)).astype(np.float32)
    with SlowStepEngine(model, cfg) as eng:
        admitted, refusals = [], []
        for sid in [eng.open_session() for _ in range(8)]:
            for _ in range(3):   # a refused turn asks again twice, as a client told to retry
                try:
                    admitted.append(eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=400)))
                    _wait_for_steps(eng, len(admitted))
                    break
                except EngineBusy as exc:
                    assert exc.retry_after_s == 0.5
                    refusals.append(exc.decision.predicted_step_s)
                    time.sleep(0.1)
        steps_before_cancel = list(eng.step_sessions)
        for turn in admitted:
            turn.cancel()
        for turn in admitted:
            list(turn.events(timeout=30))
        assert eng.stats()["refused_busy_total"] == len(refusals)
        return len(admitted), refusals, steps_before_cancel, list(zip(eng.step_seconds, eng.step_sessions))


def test_the_engine_past_capacity_keeps_admitted_answers_on_time_and_refuses_the_rest(tiny_model):
    # 0.8 x 85.3 = 68 ms a step: two answers (5 + 50 ms) fit, a third (80 ms) does not
    n, refusals, answers, _ = _drive_past_capacity(tiny_model, share=0.8)
    assert n == 2 and len(refusals) == 3 * (8 - n), (n, refusals)   # the rest refused, not slowed
    assert all(p == pytest.approx(0.080) for p in refusals)        # each for the 80 ms it would cost
    # the admitted answers' load stays flat while the other six ask and ask again: no step ever
    # carries a third answer, and both keep speaking to the end (every step since has both)
    assert max(answers) == n
    both = answers.index(n)
    assert all(k == n for k in answers[both:]), answers[both:]


def test_without_headroom_admission_every_answer_misses_its_frames(tiny_model):
    n, refusals, _, steps = _drive_past_capacity(tiny_model, share=0)
    assert (n, refusals) == (8, [])
    full = sorted(t for t, k in steps if k == 8)
    assert full and full[len(full) // 2] > FRAME_S                 # 8 x 25 ms: everyone degraded


# ---- the server: a turn refused for headroom waits briefly, then server_busy; new sessions 1013 --
class BusyEngine:
    """FakeEngine that has no step-time headroom while `busy` is set."""

    def __init__(self):
        from fake_engine import FakeEngine

        self.inner = FakeEngine(slots=4).start()
        self.busy = False
        self.refusals = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def overloaded(self) -> bool:
        return self.busy

    def submit(self, request):
        if self.busy:
            self.refusals += 1
            raise EngineBusy.refused(Decision(False, 0.2, 0.068, 2.0))
        return self.inner.submit(request)


def test_the_server_refuses_turns_and_sessions_without_headroom_and_says_when_to_retry():
    import asyncio

    from server_harness import Client, running_server
    from test_server_access import closed_with

    engine = BusyEngine()
    try:
        with running_server(engine, turn_admission_wait_s=0.3) as srv:
            async def main():
                c = await Client.connect(srv.ws)
                assert (await c.recv())["type"] == "session.created"
                engine.busy = True
                await c.send_text("hello")
                await c.send("response.create")
                t0 = time.monotonic()
                events = await c.until("error")
                waited = time.monotonic() - t0
                err = events[-1]["error"]
                assert (err["type"], err["code"]) == ("server_error", "server_busy"), err
                assert "try again in 2 s" in err["message"], err
                assert 0.3 <= waited < 2 and engine.refusals >= 3, (waited, engine.refusals)  # it waited
                code, refused = await closed_with(await Client.connect(srv.ws))        # a new session
                assert code == 1013 and refused[0]["error"]["code"] == "server_busy", refused
                engine.busy = False                                   # headroom back: answered
                await c.send_text("hello again")
                await c.send("response.create")
                done = (await c.until("response.done"))[-1]
                assert done["response"]["status"] == "completed"
                await c.close()

            asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        engine.inner.stop()


def test_the_server_knows_a_refusal_by_its_type_not_its_name():
    from omni2.server.session_items import engine_refusal, is_engine_full

    busy = EngineBusy.refused(Decision(admit=False, predicted_step_s=0.1, budget_s=0.068, retry_after_s=0.5))
    assert is_engine_full(busy) and is_engine_full(EngineFull("no slot"))
    assert "try again in 0.5 s" in engine_refusal(busy).message
    EngineFullByName = type("EngineFull", (RuntimeError,), {})  # a look-alike is not a refusal
    assert not is_engine_full(EngineFullByName()) and engine_refusal(EngineFullByName()) is None


# ---- the first-audio wait: new answers refused while those starting would delay them too long --
def test_first_audio_admission_refuses_what_would_wait_past_the_bound():
    from omni2.streaming.engine.admission import FirstAudioHeadroom

    h = FirstAudioHeadroom(factor=1.5, retry_after_s=0.5)
    assert h.decide(starting=4).admit                        # nothing known: admitted
    at = 0.0
    for _ in range(10):                                      # 200 ms alone, +150 ms each turn ahead
        for k in (1, 2, 3):
            at += 0.1
            h.observe(0.2 + 0.15 * (k - 1), k, at)
    assert h.bound_s() == pytest.approx(0.3)                 # 1.5 x 200 ms
    assert h.cost.per_unit() == pytest.approx(0.15)
    assert h.decide(starting=0).admit                        # nothing starting: it goes
    refused = h.decide(starting=1)                           # 350 ms > 300 ms
    assert not refused.admit and refused.predicted_step_s == pytest.approx(0.35)
    assert refused.bound == "first_audio" and refused.retry_after_s == 0.5
    assert "first audio" in refused.reason() and "Try again in 0.5 s" in refused.reason()
    cheap = FirstAudioHeadroom(factor=1.5)                   # a batched encoder: +40 ms a turn ahead
    for i in range(20):
        cheap.observe(0.2 + 0.04 * (i % 3), 1 + i % 3, 0.1 * i)
    assert cheap.decide(starting=1).admit and cheap.decide(starting=2).admit   # 240, 280 <= 300
    assert not cheap.decide(starting=3).admit                                  # 320 > 300
    with pytest.raises(ValueError):
        FirstAudioHeadroom(factor=0.5)


class SlowStartEngine(Engine):
    """The tiny model with every question's encoder slowed by ENCODE_S (one at a time: a queue
    of questions waits for it in turn), and each first audio measured by admission as exactly
    FIXED_S + ENCODE_S per answer starting at its submission, on a clock of its own (the
    decisions then follow the stated cost, not the load of a shared CPU)."""

    ENCODE_S, FIXED_S = 0.25, 0.2

    def start(self):
        encode = self.executor.encode

        def slow(requests):
            time.sleep(self.ENCODE_S * len(requests))
            return encode(requests)

        self.executor.encode = slow
        if self.first_audio is not None:
            self.first_audio.observe = _at_stated_cost(self.first_audio.observe, self.FIXED_S, self.ENCODE_S)
        return super().start()


def _burst(model, factor: float):
    """Two questions teach admission the cost of one and two answers starting; then six
    sessions ask at once. Returns (turns admitted in the burst, refusals, first audio of each
    admitted turn in real seconds)."""
    cfg = EngineConfig(max_sessions=8, max_steps=24, encode_batch=1, first_audio_factor=factor,
                       busy_retry_after_s=0.5)
    audio = (0.1 * np.random.RandomState(0).randn(8000)).astype(np.float32)
    with SlowStartEngine(model, cfg) as eng:
        sids = [eng.open_session() for _ in range(8)]
        first = [eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=24)) for sid in sids[:2]]
        for turn in first:
            list(turn.events(timeout=60))
        admitted, refusals = [], []
        for sid in sids[2:]:
            try:
                admitted.append(eng.submit(TurnRequest(session_id=sid, audio_16k=audio, max_steps=24)))
            except EngineBusy as exc:
                assert exc.retry_after_s == 0.5
                refusals.append(exc.decision)
        waits = []
        for turn in admitted:
            events = list(turn.events(timeout=60))
            waits.append(events[-1].stats.get("time_to_first_audio_s"))
        assert eng.stats()["refused_first_audio_total"] == len(refusals)
        return admitted, refusals, waits


@pytest.mark.parametrize("factor, admits", [(1.5, 1), (2.0, 2)])
def test_the_engine_refuses_new_answers_that_would_wait_behind_those_starting(tiny_model, factor, admits):
    # alone 200 + 250 = 450 ms; a second answer starting: 700 ms, a third 950 ms. Bound 1.5 x 450
    # = 675 ms admits one; 2 x 450 = 900 ms (`omni2 bench arrivals`, its target of first audio p99
    # within 2x p50) admits two: the burst past capacity keeps its first audio within the bound
    # and the excess is refused with a retry hint
    admitted, refusals, waits = _burst(tiny_model, factor=factor)
    assert len(admitted) == admits and len(refusals) == 6 - admits, (len(admitted), refusals)
    predicted = 0.45 + 0.25 * admits
    assert all(d.bound == "first_audio" and d.predicted_step_s == pytest.approx(predicted)
               and d.budget_s == pytest.approx(factor * 0.45) and d.retry_after_s == 0.5 for d in refusals), refusals
    assert all(w is not None for w in waits)


def test_without_first_audio_admission_the_last_of_a_burst_waits_for_all_before_it(tiny_model):
    admitted, refusals, waits = _burst(tiny_model, factor=0)
    assert len(admitted) == 6 and refusals == []
    assert max(waits) >= 6 * SlowStartEngine.ENCODE_S      # six encoders in turn before its first audio
