"""Admission on measured headroom: a new answer starts only if every playing answer keeps its frames.

One decode step gives every live answer one 2048-sample frame (85.3 ms of speech at 24 kHz),
so the step loop keeps real time only while a step takes less than a frame. Free slots say
nothing about that: a slot costs memory, an answer costs step time. The policy:

  * It keeps the decode steps of the last `window_s` seconds (at least `min_steps` of them:
    a count alone spans 0.2 s of a fast model, less than one encoder run) with their time
    t_i and answers n_i, and predicts the step time with
    `n` answers as the median over them of t_i * max(1, n / n_i): each step scaled linearly to
    `n` answers when it had fewer (a step's fixed part does not grow with its rows, so this
    over-estimates, safely), taken as is when it had as many or more. A median, because a step
    that met an encoder or another process on a shared CPU is a spike for a bounded prefill
    share to handle, not lost capacity; steps over budget half the time are.
  * A new answer is admitted while that prediction with it stays within `share` of the frame
    (the rest of the frame is left to prefill chunks and the encoders); else it is refused,
    with a retry hint, and the answers already playing go on untouched.
  * Always admitted: an answer when none is live (refusing the only one helps no one), one
    that replaces its session's live answer (no added load), and any answer before a step has
    been measured at all (nothing known; slots still bound the load).

Pure: measured step times in, decisions out; no clock, no threads (the engine feeds it).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

FRAME_S = 2048 / 24000   # one decode step = one speech frame per live answer


@dataclass(frozen=True)
class Decision:
    admit: bool
    predicted_step_s: Optional[float]    # step time predicted with the new answer (None: unknown)
    budget_s: float                      # what a step may take
    retry_after_s: float = 0.0           # refused: when to try again

    def reason(self) -> str:
        return (f"decode steps would take ~{1000 * (self.predicted_step_s or 0):.0f} ms with another answer; "
                f"the budget is {1000 * self.budget_s:.0f} ms a step (85 ms a frame). "
                f"Try again in {self.retry_after_s:g} s.")


class StepHeadroom:
    def __init__(self, share: float = 0.8, frame_s: float = FRAME_S, window_s: float = 2.0,
                 min_steps: int = 16, quantile: float = 0.5, retry_after_s: float = 1.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.budget_s = share * frame_s
        self.quantile = quantile
        self.retry_after_s = retry_after_s
        self.window_s, self.min_steps = window_s, min_steps
        self._at: collections.deque[float] = collections.deque()
        self._steps: collections.deque[tuple[float, int]] = collections.deque()

    def observe(self, step_s: float, answers: int, at: float) -> None:
        """One decode step, ended at time `at` (seconds), took `step_s` with `answers` answers."""
        if answers <= 0:
            return
        self._steps.append((step_s, answers))
        self._at.append(at)
        while len(self._at) > self.min_steps and at - self._at[0] > self.window_s:
            self._at.popleft()
            self._steps.popleft()

    def predict(self, answers: int) -> Optional[float]:
        """Step time with `answers` answers; None before any step was measured."""
        steps = list(self._steps)  # (a copy: the step thread appends while callers read)
        if not steps:
            return None
        guesses = sorted(t * max(1.0, answers / n) for t, n in steps)
        return guesses[min(len(guesses) - 1, int(self.quantile * len(guesses)))]

    def decide(self, live: int, after: int) -> Decision:
        """May the live answers go from `live` to `after`?"""
        predicted = self.predict(after)
        admit = after <= max(1, live) or predicted is None or predicted <= self.budget_s
        return Decision(admit, predicted, self.budget_s, 0.0 if admit else self.retry_after_s)

    def overloaded(self, live: int) -> bool:
        """The steps of the answers live now already miss the budget."""
        predicted = self.predict(live) if live else None
        return predicted is not None and predicted > self.budget_s
