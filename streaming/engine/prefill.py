"""How much prompt a step prefills, so that answers playing keep their frames.

The policy, in one sentence: while answers play, a step's prefill gets the time its decode
step leaves of the step budget (step_budget_share x 85.3 ms minus the predicted decode step),
at the measured cost per prefilled position, never fewer than `prefill_min_positions`
positions (every question advances) nor more than `prefill_step_positions`; the prompts
waiting share it equally, oldest first, at most `prefill_chunk` positions and at most
`prefill_turns` prompts a step. With no answer playing a step prefills the most it may.

A step of k prompts is one forward call padded to its longest chunk, so its cost is k times
that chunk: the plan keeps k x chunk within the positions allowed. A spike (an encoder on the
same cores, a step that met another process) is what the client's jitter buffer absorbs;
the bound keeps prefill from taking the frame step after step while questions keep arriving.

Pure: measured prefill times in, plans out; no clock, no threads (the engine feeds it).
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

from .admission import StepCost

K = TypeVar("K")


class PrefillBudget:
    def __init__(self, budget_s: Optional[float], most: int, least: int, chunk: int, turns: int) -> None:
        """budget_s: what a whole step may take (None: prefill is not bounded by time)."""
        if not 1 <= least <= most:
            raise ValueError(f"need 1 <= least ({least}) <= most ({most})")
        self.budget_s, self.most, self.least, self.chunk, self.turns = budget_s, most, least, chunk, turns
        # prefill calls are rarer than decode steps: a longer window for the same evidence
        self.cost = StepCost(window_s=10.0, min_calls=8)

    def observe(self, seconds: float, positions: int, at: float) -> None:
        """A prefill call of `positions` computed positions (prompts x padded chunk) took `seconds`."""
        self.cost.observe(seconds, positions, at)

    def positions(self, decode_s: Optional[float]) -> int:
        """Positions this step may prefill, given its decode step's predicted time (None: no
        answer plays, or nothing is known about it)."""
        if decode_s is None or self.budget_s is None:
            return self.most
        fits = self.cost.units_within(self.budget_s - decode_s, self.most)
        return self.least if fits is None else max(self.least, fits)

    def plan(self, waiting: Sequence[tuple[K, int]], positions: int) -> list[tuple[K, int]]:
        """(prompt, positions left) oldest first -> (prompt, positions this step) for each
        prompt that gets a chunk. Equal shares, as many prompts as keep a share >= least."""
        k = min(self.turns, len(waiting))
        while k > 1 and positions // k < self.least:
            k -= 1
        if k == 0:
            return []
        share = max(1, min(self.chunk, positions // k))
        return [(key, min(left, share)) for key, left in waiting[:k]]


class EncodeBatch:
    """How many waiting questions the prep thread encodes in one call.

    A batch of k finishes all k when the call ends: with a call costing `fixed + k x
    per_question`, the k questions wait fixed + k x per_question each, one at a time they wait
    (fixed + per_question) x (k + 1) / 2 on average. So batching shortens the average wait
    exactly when fixed > per_question (a GPU, where a call is mostly launch cost); on the 2-core
    CPU a tiny question costs ~9 ms and a call's fixed part under 1 ms, and a batch only made the
    first question wait for the others. The rule: the fit (admission.StepCost over the encoder
    calls: seconds against questions) needs a call of one question and one of several: until
    it has both, a call takes what waits (up to `most`), or one question once only batches were
    seen; then `most` while the fixed part exceeds the per-question cost, else one. Pure: the
    engine feeds it the calls' times."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.cost = StepCost(window_s=10.0, min_calls=8)

    def observe(self, seconds: float, questions: int, at: float) -> None:
        self.cost.observe(seconds, questions, at)

    def size(self) -> int:
        per, one = self.cost.per_unit(), self.cost.alone(1)
        if one is None:  # (a call of one question not seen yet: learn it once batches were)
            return 1 if self.cost.sizes() else self.most
        if per is None:
            return self.most
        return self.most if one - per > per else 1
