"""Admission on measured headroom: a new answer starts only if every playing answer keeps its frames.

One decode step gives every live answer one 2048-sample frame (85.3 ms of speech at 24 kHz),
so the step loop keeps real time only while a step takes less than a frame. Free slots say
nothing about that: a slot costs memory, an answer costs step time. The policy:

  * A step's time is a fixed part (launching the layers, the heads, Python) plus a part per
    answer (its rows): `StepCost` fits the per-answer cost from the steps seen at different
    batch sizes and predicts the step time with `n` answers as the median, over the decode
    steps of the last `window_s` seconds (at least `min_steps` of them: a count alone spans
    0.2 s of a fast model, less than one encoder run), of t_i + per_answer * (n - n_i) (a step
    with as many answers or more taken as is). So a slow fixed part no longer refuses a
    second answer that costs little, and a large per-answer cost still does. Until two batch
    sizes were seen it scales each step linearly, t_i * n / n_i (an over-estimate, safe). A
    median, because a step that met an encoder or another process on a shared CPU is a spike
    for the bounded prefill share to handle, not lost capacity; steps over budget half the
    time are.
  * A new answer is admitted while that prediction with it stays within `share` of the frame
    (the rest of the frame is left to prefill chunks and the encoders); else it is refused,
    with a retry hint, and the answers already playing go on untouched.
  * Always admitted: an answer when none is live (refusing the only one helps no one), one
    that replaces its session's live answer (no added load), and any answer before a step has
    been measured at all (nothing known; slots still bound the load).

Steps within budget keep playing answers on time; they say nothing about how long a *new*
question waits for its first audio while others are being started (encoders, prefill, the
vocoder's first window). `FirstAudioHeadroom` bounds that wait, with the same fit:

  * units are the answers *starting* (submitted, no audio yet), the new one included; each
    first audio is observed with the count its turn found at submission. The prediction for
    a new turn is StepCost's median over the last `window_s` seconds, moved along the fitted
    per-starting-answer cost, and it is compared with the first audio of an answer that
    started alone (the median of the last 16 such, however old).
  * A new answer is admitted while its predicted first audio stays within `factor` x that
    alone figure (`omni2 bench arrivals`: 2, its own target of first audio p99 within 2x
    p50), else refused with a retry hint: the turns admitted then keep their first audio
    near the unloaded one instead of every new question waiting behind a growing queue.
    Always admitted: an answer when none is starting, and any answer before a turn started
    alone was measured. (1.5 refused about half the answers that found one other starting on
    the 2-core CPU, where a second one adds 0.3-0.7x: too strict for the 2x target.)

Pure: measured step times in, decisions out; no clock, no threads (the engine feeds it).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

from omni2.model.snac_layout import SAMPLE_RATE, SAMPLES_PER_FRAME

FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE   # one decode step = one speech frame per live answer


@dataclass(frozen=True)
class Decision:
    admit: bool
    predicted_step_s: Optional[float]    # step time predicted with the new answer (None: unknown);
                                         # bound "first_audio": its predicted first audio
    budget_s: float                      # what a step may take (first_audio: the first audio allowed)
    retry_after_s: float = 0.0           # refused: when to try again
    bound: str = "step"                  # what refused it: "step" (decode step time) or "first_audio"

    def reason(self) -> str:
        if self.bound == "first_audio":
            return (f"a new answer would wait ~{1000 * (self.predicted_step_s or 0):.0f} ms for its first audio "
                    f"behind the answers starting now; the bound is {1000 * self.budget_s:.0f} ms. "
                    f"Try again in {self.retry_after_s:g} s.")
        return (f"decode steps would take ~{1000 * (self.predicted_step_s or 0):.0f} ms with another answer; "
                f"the budget is {1000 * self.budget_s:.0f} ms a step (85 ms a frame). "
                f"Try again in {self.retry_after_s:g} s.")


class StepCost:
    """Time of a batched call as a fixed part plus a part per unit (answers of a decode step,
    positions of a prefill), learnt from the calls it is shown.

    The per-unit cost is the least-squares slope over the median time of each batch size (the
    last `per_size` calls of each, however old: the split between fixed and per-unit cost is a
    property of the model and the machine, and a size seen once a minute still tells it). The
    level comes from the recent calls alone (the last `window_s` seconds, at least `min_calls`):
    each is moved to `units` along the slope when it had fewer (taken as is when it had as many
    or more) and the `quantile` of those guesses is the prediction. Until two batch sizes were
    seen nothing tells the split, and each call is scaled as if all of it grew with its units
    (t * units / n: an over-estimate, safe)."""

    def __init__(self, window_s: float = 2.0, min_calls: int = 16, quantile: float = 0.5,
                 per_size: int = 16, fit: bool = True) -> None:
        self.window_s, self.min_calls, self.quantile, self.per_size = window_s, min_calls, quantile, per_size
        self.fit = fit  # False: never split the cost (every call scaled linearly)
        self._recent: collections.deque[tuple[float, int, float]] = collections.deque()  # (t, n, at)
        self._by_size: dict[int, collections.deque] = {}

    def observe(self, seconds: float, units: int, at: float) -> None:
        if units <= 0:
            return
        self._recent.append((seconds, units, at))
        while len(self._recent) > self.min_calls and at - self._recent[0][2] > self.window_s:
            self._recent.popleft()
        if self.fit:
            self._by_size.setdefault(units, collections.deque(maxlen=self.per_size)).append(seconds)

    def per_unit(self) -> Optional[float]:
        """The fitted cost of one more unit, or None before two batch sizes were seen.

        Bounded by 0 and by the smallest t / n of the sizes seen: no part of a call costs less
        than nothing, so a unit never costs more than a whole call over its units. Without the
        bound a few slow calls at one size (a cold start, a noisy neighbour) make a steep slope
        that refuses the very answers whose steps would correct it."""
        points = [(n, _median(list(ts))) for n, ts in list(self._by_size.items()) if ts]
        if len(points) < 2:
            return None
        mn = sum(n for n, _ in points) / len(points)
        mt = sum(t for _, t in points) / len(points)
        var = sum((n - mn) ** 2 for n, _ in points)
        slope = sum((n - mn) * (t - mt) for n, t in points) / var
        return min(max(0.0, slope), min(t / n for n, t in points))

    def predict(self, units: int) -> Optional[float]:
        """Seconds of a call with `units` units; None before any call was seen."""
        recent = list(self._recent)  # (a copy: the step thread appends while callers read)
        if not recent:
            return None
        slope = self.per_unit()
        if slope is None:
            guesses = [t * max(1.0, units / n) for t, n, _ in recent]
        else:
            guesses = [t + slope * max(0, units - n) for t, n, _ in recent]
        guesses.sort()
        return guesses[min(len(guesses) - 1, int(self.quantile * len(guesses)))]

    def sizes(self) -> set:
        """The unit counts seen (fit on)."""
        return set(self._by_size)

    def alone(self, units: int = 1) -> Optional[float]:
        """The median of the last calls with exactly `units` units (None: none seen, or fit off)."""
        ts = self._by_size.get(units)
        return _median(list(ts)) if ts else None

    def units_within(self, seconds: float, most: int) -> Optional[int]:
        """The most units (<= `most`) a call may have and still be predicted within `seconds`
        (0 when not even one fits); None before any call was seen."""
        if self.predict(1) is None:
            return None
        lo, hi = 0, most
        while lo < hi:  # predict() grows with units: bisect
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


class StepHeadroom:
    def __init__(self, share: float = 0.8, frame_s: float = FRAME_S, window_s: float = 2.0,
                 min_steps: int = 16, quantile: float = 0.5, retry_after_s: float = 1.0,
                 fit: bool = True) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.budget_s = share * frame_s
        self.retry_after_s = retry_after_s
        # fit=False: every step scaled linearly (the benchmarks' one-at-a-time baseline)
        self.cost = StepCost(window_s, min_steps, quantile, fit=fit)

    def observe(self, step_s: float, answers: int, at: float) -> None:
        """One decode step, ended at time `at` (seconds), took `step_s` with `answers` answers."""
        self.cost.observe(step_s, answers, at)

    def predict(self, answers: int) -> Optional[float]:
        """Step time with `answers` answers; None before any step was measured."""
        return self.cost.predict(answers)

    def decide(self, live: int, after: int) -> Decision:
        """May the live answers go from `live` to `after`?"""
        predicted = self.predict(after)
        admit = after <= max(1, live) or predicted is None or predicted <= self.budget_s
        return Decision(admit, predicted, self.budget_s, 0.0 if admit else self.retry_after_s)

    def overloaded(self, live: int) -> bool:
        """The steps of the answers live now already miss the budget."""
        predicted = self.predict(live) if live else None
        return predicted is not None and predicted > self.budget_s


class FirstAudioHeadroom:
    """Admission on the first-audio wait of a new answer (the policy is in the module docstring)."""

    def __init__(self, factor: float = 1.5, window_s: float = 10.0, min_turns: int = 8,
                 retry_after_s: float = 1.0) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor, self.retry_after_s = factor, retry_after_s
        self.cost = StepCost(window_s, min_turns)

    def observe(self, first_audio_s: float, starting: int, at: float) -> None:
        """A turn that found `starting` answers starting at its submission, itself included, had
        its first audio `first_audio_s` after it; observed at time `at` (seconds)."""
        self.cost.observe(first_audio_s, starting, at)

    def bound_s(self) -> Optional[float]:
        """The first audio allowed: factor x that of an answer started alone (None: not seen yet)."""
        alone = self.cost.alone(1)
        return None if alone is None else self.factor * alone

    def decide(self, starting: int) -> Decision:
        """May a new answer start while `starting` others are starting?"""
        bound = self.bound_s()
        predicted = self.cost.predict(starting + 1) if bound is not None else None
        admit = starting == 0 or predicted is None or predicted <= bound
        return Decision(admit, predicted, bound or 0.0, 0.0 if admit else self.retry_after_s, bound="first_audio")
