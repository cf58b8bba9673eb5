"""`omni2 bench arrivals`: the engine under turns that arrive at random, judged by deadlines.

`bench engine` submits every turn at once and reports steady-state throughput. A voice product
promises deadlines instead, so here questions arrive open-loop, as a Poisson process of `rate`
turns/s spread over `sessions` conversations, for `duration_s`. Each goes to a session whose
last answer has finished playing (a listener asks after hearing the answer), or, when every
session is still busy, interrupts a random one (a barge-in, counted). Every question is
encoded in its turn (Whisper, adapters, prefill: the real work of an arrival).

Each answer's audio is played by a simulated client with a `jitter_s` buffer
(clients/loadtest.count_underruns): a chunk that arrives after the player ran dry is an
underrun. Reported per rate: decode step p50/p99, underruns per answer, time to first audio
(submit -> first audio chunk) p50/p90/p99 of the admitted turns, refusals (admission on step
headroom and on the first-audio wait, streaming/engine/admission.py), and the cores the
machine's other processes kept busy meanwhile (`others`: on a shared machine, how shared).

The hold rule, stated: a rate is *held* when no admitted answer underran, at most 1% of the
offered turns were refused, and first audio p99 stayed within 2x its p50. Percentiles are
nearest-rank, so a probe runs for `duration_s` and until at least `min_turns` (100) turns were
offered: the p99 of 100 turns is the second slowest,
so no single slow turn (a neighbour's process on a shared CPU) decides a probe, which is
what made the held rate swing 6-20x with 12 s probes of 3-50 turns. Before a search, one
unmeasured burst warms the process (the encoders', prefill's and SNAC's first calls at each
batch size are slower: oneDNN builds their kernels), and every engine runs its own warm-up
with answers as long as the measured ones.
`search` doubles the rate while it holds, then bisects between the last held and the first
failed rate; the held rate reported is the median over `repeats` searches, and the first
failed rate of each search shows what admission does past it (admitted underruns and first
audio, refused share). `ttfa_target=False` searches for the largest rate whose deadlines
were all kept (0 underruns, refusals within 1%), first audio aside.
"""
from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from omni2.clients.figures import count_underruns, percentile
from omni2.model.snac_layout import SAMPLE_RATE
from omni2.streaming.engine.admission import FRAME_S

from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.cpu.threads import DEFAULT_THREADS, in_fresh_thread
from omni2.streaming.engine.engine import Engine, EngineFull
from omni2.streaming.engine.messages import AudioChunk, TurnDone, TurnRequest



@dataclass
class ArrivalRun:
    sessions: int
    rate: float                 # offered turns/s
    duration_s: float
    turns: int                  # submitted and admitted
    refused: int                # EngineFull / EngineBusy at submit
    barge_ins: int              # arrivals that found every session busy
    underruns: int
    answers_with_underruns: int
    step_p50_ms: float
    step_p99_ms: float
    ttfa_p50_ms: float
    ttfa_p90_ms: float
    ttfa_p99_ms: float
    mean_live: float            # answers per decode step, on average
    load_avg: float = 0.0       # the machine's 1-minute load average at the end (shared machines)
    batched: bool = True        # False: the one-at-a-time baseline scheduling
    refused_first_audio: int = 0  # of `refused`: for the first-audio wait (the rest: step headroom)
    others_cores: float = float("nan")  # cores the machine's other processes used during the probe

    @property
    def offered(self) -> int:
        return self.turns + self.refused

    @property
    def ttfa_target_met(self) -> bool:
        return self.ttfa_p99_ms <= 2 * self.ttfa_p50_ms

    @property
    def kept_deadlines(self) -> bool:
        """Every admitted frame on time, at most 1% of the turns refused (first audio not judged)."""
        return self.underruns == 0 and self.refused <= 0.01 * self.offered and self.turns > 0

    @property
    def held(self) -> bool:
        return self.kept_deadlines and self.ttfa_target_met


class _Listener:
    """One answer as a client hears it: audio arrival times, then underruns and first audio."""

    def __init__(self, turn, submitted_at: float, jitter_s: float, barge_in: bool = False) -> None:
        self.turn, self.submitted_at, self.jitter_s = turn, submitted_at, jitter_s
        self.barge_in = barge_in                 # it found every session busy (it cut one short)
        self.arrivals: list[tuple[float, int]] = []
        self.plays_until = float("inf")          # when its playback ends (known once done)
        self.done: TurnDone | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for ev in self.turn.events(timeout=600):
            if isinstance(ev, AudioChunk) and ev.pcm.size:
                self.arrivals.append((time.monotonic(), ev.pcm.size))
            elif isinstance(ev, TurnDone):
                self.done = ev
        audio_s = sum(n for _, n in self.arrivals) / SAMPLE_RATE
        start = self.arrivals[0][0] if self.arrivals else time.monotonic()
        self.plays_until = max(start + self.jitter_s + audio_s, time.monotonic())

    @property
    def ttfa_s(self) -> float | None:
        return self.arrivals[0][0] - self.submitted_at if self.arrivals else None

    @property
    def underruns(self) -> int:
        return count_underruns(self.arrivals, self.jitter_s)


STAGES = ("encoded", "admitted", "decoding", "frames", "first_audio")


def turn_stages(lis: "_Listener") -> dict:
    """One admitted turn's start, stage by stage: ms from the previous stage reached (the first
    from submission; None where the turn never got there), its first audio as heard, barge-in,
    and when it waited (`window`: submission to first audio, perf_counter seconds, or None)."""
    out, prev = {}, lis.turn.submitted_at
    for name in STAGES:
        at = lis.turn.stamps.get(name)
        out[name] = None if at is None or prev is None else 1000 * (at - prev)
        prev = at
    ttfa = lis.ttfa_s
    window = None if ttfa is None else (lis.turn.submitted_at, lis.turn.submitted_at + ttfa)
    return out | lis.turn.found | {"ttfa": None if ttfa is None else 1000 * ttfa, "barge_in": lis.barge_in,
                  "reason": lis.done.reason if lis.done is not None else None, "window": window}


def _pct(values: list, p: float) -> float:
    """percentile for a printed figure: nan where there are no values (0 stays 0)."""
    value = percentile(values, p)
    return float("nan") if value is None else value


def stage_line(records: list) -> str:
    """Where the admitted turns' first audio went (turn_stages records): p50/p99 ms of each stage,
    and the barge-ins' median first audio against the other turns'."""
    rec = [r for r in records if r["ttfa"] is not None]

    def q(key, p, rs=rec):
        return _pct([r[key] for r in rs if r[key] is not None], p)

    stages = ", ".join(f"{k} {q(k, 50):.0f}/{q(k, 99):.0f}" for k in (*STAGES, "ttfa"))
    barge = [r for r in rec if r["barge_in"]]
    rest = [r for r in rec if not r["barge_in"]]
    return (f"  stages p50/p99 ms (each from the one before): {stages}; barge-ins {len(barge)} of {len(rec)}, "
            f"first audio p50 {q('ttfa', 50, barge):.0f} vs {q('ttfa', 50, rest):.0f} ms for the others")


class Collections:
    """Python's cyclic garbage collections while it is entered (gc.callbacks): (generation, start
    perf_counter, seconds) each. A collection holds the GIL, so every engine thread waits it out;
    a generation-2 one walks every live object (the tiny runtime loaded: ~3.3e5 objects, 305 ms
    on the 2-core machine)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float]] = []
        self._started = 0.0

    def _note(self, phase: str, info: dict) -> None:
        # collections never overlap (the collector holds the GIL and refuses to re-enter)
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], self._started, time.perf_counter() - self._started))

    def __enter__(self) -> "Collections":
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._note)


def _inside(window, spans) -> float:
    """Seconds of the (start, seconds) spans that fall inside window (start, end)."""
    return sum(max(0.0, min(window[1], at + s) - max(window[0], at)) for at, s in spans)


def wait_line(records: list, pauses: list) -> str:
    """What the slowest first audios met that the others did not: cyclic collections (`pauses`,
    Collections.pauses) inside their wait, and other turns starting (waiting for their own first
    audio at submission, or submitted during the wait), slowest tenth against the rest; and the
    first audio of the turns that started alone."""
    rec = sorted((r for r in records if r.get("window")), key=lambda r: -r["ttfa"])
    by_gen = ", ".join(f"gen{g} {sum(1 for p in pauses if p[0] == g)} "
                       f"({1000 * sum(p[2] for p in pauses if p[0] == g):.0f} ms)" for g in range(3))
    if not rec:
        return f"  collections: {by_gen}"
    starts = sorted(r["window"][0] for r in rec)

    def met(r):
        return r.get("starting", 0) + sum(1 for t in starts if r["window"][0] < t < r["window"][1])

    def gc_ms(r):
        return 1000 * _inside(r["window"], [(at, s) for _, at, s in pauses])

    slow, rest = rec[:max(1, len(rec) // 10)], rec[max(1, len(rec) // 10):]
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    alone = [r["ttfa"] for r in rec if not met(r)]
    return (f"  collections: {by_gen}; inside a first-audio wait: slowest tenth {mean([gc_ms(r) for r in slow]):.1f} ms, "
            f"the rest {mean([gc_ms(r) for r in rest]):.1f} ms; other turns starting meanwhile: slowest tenth "
            f"{mean([met(r) for r in slow]):.2f}, the rest {mean([met(r) for r in rest]):.2f}; "
            f"first audio of the {len(alone)} that met none p50/p99 {_pct(alone, 50):.0f}/{_pct(alone, 99):.0f} ms")


def _open(eng: Engine, wait_s: float = 5.0) -> str:
    """A session, once the warm-up's slot is released (at the next step boundary)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return eng.open_session()
        except EngineFull:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class OthersLoad:
    """Cores the machine's other processes keep busy over an interval: all CPU time of the
    machine (/proc/stat) less this process's (a shared machine's figures say how shared; nan
    where /proc is missing)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    def cores(self) -> float:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return float("nan")
        return max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1])) / (end[2] - self.start[2])


def question(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.RandomState(seed).randn(int(16000 * seconds))).astype(np.float32)


FIRST_AUDIO_FACTOR = 2.0   # the bench's EngineConfig.first_audio_factor (the engine's default is off)
MIN_TURNS = 100


def arrival_run(model, sessions: int, rate: float, duration_s: float, answer_s: float = 4.0,
                question_s: float = 2.0, jitter_s: float = 0.2, seed: int = 0,
                step_budget_share: float = EngineConfig.step_budget_share, batched: bool = True,
                first_audio_factor: float = FIRST_AUDIO_FACTOR, min_turns: int = 0,
                record: list | None = None, pauses: list | None = None) -> ArrivalRun:
    """batched=False: the engine's one-at-a-time scheduling (EngineConfig.batched_arrivals).
    Arrivals go on for `duration_s` and until `min_turns` turns were offered. `record`: a list
    that gets one dict per admitted turn (turn_stages: its stage times, barge-in or not);
    `pauses`: a list that gets the cyclic collections of the measured part (Collections.pauses)."""
    steps = int(answer_s / FRAME_S) + 7   # speech frames lag the steps by the 7-layer delay
    cfg = EngineConfig(max_sessions=sessions, max_steps=steps, timing_window=1 << 20,
                       step_budget_share=step_budget_share, batched_arrivals=batched,
                       first_audio_factor=first_audio_factor)
    rng = np.random.default_rng(seed)
    with Engine(model, cfg) as eng, Collections() as collections:
        # answers as long as the bench's: the vocoder's full-width windows (24 frames) and the
        # question's encoder run once before the clock starts (with 4 steps the first 24-frame
        # SNAC call of each engine fell on a measured turn: 127 ms against a median of 36)
        eng.warmup(seconds=question_s, steps=steps)
        sids = [_open(eng) for _ in range(sessions)]
        current: dict[str, _Listener] = {}
        listeners: list[_Listener] = []
        refused = barge_ins = 0
        first_step = len(eng.step_seconds)
        others = OthersLoad()
        collections.pauses.clear()   # the warm-up's aside
        t0 = time.monotonic()
        at = t0
        k = 0
        while True:
            at += rng.exponential(1 / rate)
            if at - t0 > duration_s and k >= min_turns:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            now = time.monotonic()
            idle = [s for s in sids if s not in current or current[s].plays_until <= now]
            if not idle:
                barge_ins += 1
            sid = idle[rng.integers(len(idle))] if idle else sids[rng.integers(sessions)]
            k += 1
            try:
                turn = eng.submit(TurnRequest(session_id=sid, audio_16k=question(question_s, seed + k),
                                              max_steps=steps))
            except EngineFull:
                refused += 1
                continue
            current[sid] = _Listener(turn, time.monotonic(), jitter_s, barge_in=not idle)
            listeners.append(current[sid])
        for lis in listeners:
            lis.thread.join(timeout=600)
        others_cores = others.cores()
        step_s = list(eng.step_seconds)[first_step:]
        step_n = list(eng.step_sessions)[first_step:]
        refused_first_audio = eng.counters["refused_first_audio"]
    if record is not None:
        record += [turn_stages(lis) for lis in listeners]
    if pauses is not None:
        pauses += collections.pauses
    # a barged-in answer ends early by design: its stall after the cancel is no underrun
    heard = [lis for lis in listeners if lis.done is not None and lis.done.reason != "cancelled"]
    ttfa = [lis.ttfa_s for lis in listeners if lis.ttfa_s is not None]
    under = [lis.underruns for lis in heard]
    q = lambda xs, p: 1000 * _pct(xs, p)  # noqa: E731
    return ArrivalRun(sessions=sessions, rate=rate, duration_s=round(at - t0, 2), turns=len(listeners),
                      refused=refused,
                      barge_ins=barge_ins, underruns=sum(under), answers_with_underruns=sum(1 for u in under if u),
                      step_p50_ms=q(step_s, 50), step_p99_ms=q(step_s, 99), ttfa_p50_ms=q(ttfa, 50),
                      ttfa_p90_ms=q(ttfa, 90), ttfa_p99_ms=q(ttfa, 99),
                      mean_live=statistics.fmean(step_n) if step_n else 0.0, load_avg=os.getloadavg()[0],
                      batched=batched, refused_first_audio=refused_first_audio, others_cores=others_cores)


def search_rates(run, start: float, bisections: int = 3, max_rate: float = 64.0, out=print,
                 holds=lambda r: r.held) -> tuple[float, list]:
    """The largest rate `run(rate)` holds: double from `start` until one fails, then bisect."""
    runs, held, failed = [], 0.0, None
    rate = start
    while failed is None and rate <= max_rate:
        r = run(rate)
        runs.append(r)
        out(_row(r, holds(r)))
        if holds(r):
            held, rate = rate, rate * 2
        else:
            failed = rate
    for _ in range(bisections if failed is not None else 0):
        rate = (held + failed) / 2 if held else failed / 2
        r = run(rate)
        runs.append(r)
        out(_row(r, holds(r)))
        if holds(r):
            held = rate
        else:
            failed = rate
    return held, runs


HEADER = (f"{'sessions':>8} {'rate/s':>7} {'turns':>6} {'refused':>7} {'(1st a.)':>8} {'barge-in':>8} "
          f"{'underruns':>9} {'step p50':>8} {'p99 ms':>7} {'ttfa p50':>8} {'p90':>6} {'p99 ms':>7} {'live':>5} "
          f"{'load':>5} {'others':>6} {'sched':>5}  held")


def _row(r: ArrivalRun, held: bool) -> str:
    """The run's line; `held` by the rule in use (with --no-ttfa-target a slow first-audio tail
    is listed but does not fail the rate)."""
    why = [w for w, bad in (("underruns", r.underruns), ("refused > 1%", r.refused > 0.01 * r.offered),
                            ("first audio p99 > 2x p50", r.turns and not r.ttfa_target_met)) if bad]
    reasons = f" ({', '.join(why)})" if why else ""
    return (f"{r.sessions:>8} {r.rate:>7.2f} {r.turns:>6} {r.refused:>7} {r.refused_first_audio:>8} "
            f"{r.barge_ins:>8} {r.underruns:>9} {r.step_p50_ms:>8.1f} {r.step_p99_ms:>7.1f} {r.ttfa_p50_ms:>8.0f} "
            f"{r.ttfa_p90_ms:>6.0f} {r.ttfa_p99_ms:>7.0f} {r.mean_live:>5.1f} {r.load_avg:>5.1f} {r.others_cores:>6.2f} "
            f"{'batch' if r.batched else 'base':>5}  {'yes' if held else 'no'}{reasons}")


def past_held(runs: list, held: float):
    """The probe at the lowest rate above `held` (what admission did past the held rate), or None."""
    above = [r for r in runs if r.rate > held]
    return min(above, key=lambda r: r.rate) if above else None


def run_arrivals_bench(size: str = "tiny", device: str = "cpu", sessions=(8, 16), rate: float = 2.0,
                       search: bool = True, duration_s: float = 8.0, answer_s: float = 4.0,
                       question_s: float = 2.0, jitter_ms: float = 200.0, bisections: int = 2,
                       ttfa_target: bool = True, baseline: bool = False, repeats: int = 1,
                       modes=None, min_turns: int = MIN_TURNS, first_audio_factor: float = FIRST_AUDIO_FACTOR,
                       stages: bool = False, out=print) -> dict:
    """With `baseline`, every measurement is also made with the one-at-a-time scheduling, in
    turn with the batched one (rep by rep: both see the same shared machine); held rates are
    medians over `repeats`. `modes` ("batched", "baseline") picks them explicitly (one alone:
    to alternate the two across separately locked runs)."""
    from omni2.streaming.engine.runtime import load_runtime

    from .bench_engine import random_model

    modes = modes or (["batched", "baseline"] if baseline else ["batched"])
    if not set(modes) <= {"batched", "baseline"}:
        raise ValueError(f"modes are batched and baseline, got {modes}")
    modes = [m == "batched" for m in modes]
    out(f"# omni2 bench arrivals: model={size} device={device} poisson arrivals for {duration_s:g} s and "
        f"at least {min_turns} turns a rate, answers {answer_s:g} s, questions {question_s:g} s, jitter buffer {jitter_ms:g} ms, "
        f"first-audio admission factor {first_audio_factor:g}, torch threads={DEFAULT_THREADS}, repeats={repeats}, "
        f"scheduling {' + '.join('batched' if m else 'one-at-a-time baseline' for m in modes)}")
    out("# held: 0 underruns, refused <= 1% of offered, first audio p99 <= 2x p50 (nearest rank)"
        if ttfa_target else "# held: 0 underruns, refused <= 1% of offered (first audio not judged)")
    load = (lambda: load_runtime("tiny", device=device, prepack=device == "cpu")) if size == "tiny" else (
        lambda: random_model(size, __import__("torch").float32, device))
    model = in_fresh_thread(load, threads=DEFAULT_THREADS)
    if device == "cpu":
        from omni2.streaming.cpu.threads import model_threads
        from omni2.streaming.engine.engine import model_width

        width = model_width(model)
        out(f"# the engine's steps and encoders: {model_threads(width) if width else DEFAULT_THREADS} torch thread(s) "
            f"each (model width {width}, streaming/cpu/threads.model_threads), the vocoder 1")
    results = {"runs": [], "held_rate": {}, "held_rates": {}, "past_held": {}}
    if False in modes:
        results.update(baseline_held_rate={}, baseline_held_rates={}, baseline_past_held={})
    holds = (lambda r: r.held) if ttfa_target else (lambda r: r.kept_deadlines)
    for n in sessions:
        for batched in modes:  # unmeasured: the first calls at each batch size build their kernels
            in_fresh_thread(arrival_run, model, n, max(2.0, n / 2), 3.0, answer_s, question_s, jitter_ms / 1000,
                            seed=10_000, batched=batched, first_audio_factor=first_audio_factor,
                            threads=DEFAULT_THREADS)
        out(HEADER)
        held_by = {m: [] for m in modes}
        past_by = {m: [] for m in modes}
        for rep in range(repeats):
            for batched in modes:
                def one(r, n=n, batched=batched, rep=rep):
                    # the step thread keeps the only OpenMP team: the engine runs from a short-lived thread
                    record, pauses = ([], []) if stages else (None, None)
                    run = in_fresh_thread(arrival_run, model, n, r, duration_s, answer_s, question_s,
                                          jitter_ms / 1000, seed=rep, batched=batched,
                                          first_audio_factor=first_audio_factor, min_turns=min_turns,
                                          record=record, pauses=pauses, threads=DEFAULT_THREADS)
                    if stages:
                        out(stage_line(record))
                        out(wait_line(record, pauses))
                    return run
                if search:
                    held, runs = search_rates(one, rate, bisections, out=out, holds=holds)
                else:
                    runs = [one(rate)]
                    out(_row(runs[0], holds(runs[0])))
                    held = rate if holds(runs[0]) else 0.0
                held_by[batched].append(held)
                past = past_held(runs, held)
                past_by[batched].append(None if past is None else asdict(past))
                if past is not None:
                    out(f"  past the held rate {held:g}: at {past.rate:g} turns/s {past.refused} of {past.offered} "
                        f"refused ({past.refused_first_audio} for first audio), admitted answers "
                        f"{past.underruns} underruns, first audio p50/p99 {past.ttfa_p50_ms:.0f}/{past.ttfa_p99_ms:.0f} ms")
                results["runs"] += [asdict(r) | {"held": holds(r)} for r in runs]
        for batched in modes:
            key = "held_rate" if batched else "baseline_held_rate"
            results[key][n] = statistics.median(held_by[batched])
            results[key + "s"][n] = held_by[batched]
            results["past_held" if batched else "baseline_past_held"][n] = past_by[batched]
            out(f"{n} sessions, {'batched' if batched else 'one-at-a-time baseline'}: largest rate held "
                f"{results[key][n]:g} turns/s (median of {held_by[batched]})"
                f"{'' if ttfa_target else ' (first audio not judged)'}")
    return results
