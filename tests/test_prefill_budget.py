"""The share of a step given to prefill (streaming/engine/prefill.py), alone: measured prefill
costs and a predicted decode step in, positions and chunks out. The engine under it with a
fake executor: tests/test_scheduler.py."""
import pytest

from omni2.streaming.engine.prefill import PrefillBudget


def _budget(**kw):
    args = dict(budget_s=0.068, most=512, least=32, chunk=256, turns=8) | kw
    return PrefillBudget(**args)


def test_with_nothing_playing_a_step_prefills_the_most_and_unknown_costs_get_the_least():
    b = _budget()
    assert b.positions(decode_s=None) == 512
    assert b.positions(decode_s=0.040) == 32                  # answers play, no prefill measured yet
    assert _budget(budget_s=None).positions(decode_s=0.040) == 512   # no time bound (admission off)


def test_the_positions_fill_the_time_the_decode_step_leaves():
    b = _budget()
    for i, n in enumerate([64, 128, 256] * 4):               # 2 ms + 0.1 ms a position
        b.observe(0.002 + 0.0001 * n, n, at=0.1 * i)
    assert b.cost.per_unit() == pytest.approx(0.0001)
    assert b.positions(decode_s=0.040) == pytest.approx(260, abs=1)   # (68 - 40 - 2) ms / 0.1 ms
    assert b.positions(decode_s=0.010) == 512                 # capped
    assert b.positions(decode_s=0.070) == 32                  # over budget already: still the least


def test_waiting_prompts_share_a_step_equally_oldest_first():
    b = _budget()
    assert b.plan([("a", 300), ("b", 10), ("c", 500)], 512) == [("a", 170), ("b", 10), ("c", 170)]
    assert b.plan([("a", 300)], 512) == [("a", 256)]          # at most a chunk each
    assert b.plan([(k, 100) for k in "abcdefghij"], 512) == [(k, 64) for k in "abcdefgh"]  # 8 prompts
    assert b.plan([("a", 300), ("b", 300), ("c", 300)], 70) == [("a", 35), ("b", 35)]  # shares >= least
    assert b.plan([("a", 300), ("b", 300)], 32) == [("a", 32)]
    assert b.plan([], 512) == []


def test_questions_are_encoded_together_only_where_a_batch_shortens_their_wait():
    from omni2.streaming.engine.prefill import EncodeBatch

    def taught(fixed, per):
        b = EncodeBatch(most=8)
        assert b.size() == 8                                  # nothing known: batch (and learn)
        for i in range(24):
            k = 1 + i % 3
            b.observe(fixed + per * k, k, 0.01 * i)
        return b.size()

    assert taught(fixed=0.050, per=0.005) == 8                # launch-bound (a GPU): one call for all
    assert taught(fixed=0.001, per=0.009) == 1                # compute-bound (the 2-core CPU): one at a time
    assert taught(fixed=0.010, per=0.010) == 1                # no gain: the first need not wait for the rest
