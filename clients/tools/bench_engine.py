"""`omni2 bench engine`: engine throughput against the released demo's way of decoding.

Baseline, measured in the same run on the same weights: one turn at a time, its two rows
with a KV cache as long as the context (the release attends over the whole 2048-position
cache every step), the full 181,120-row head for both rows, and per-token sampling with a
host sync per token, as the release's top-k=1 sampler does. The engine must produce the
same tokens (checked) and is timed at 1, 2, 4, ... concurrent sessions, and for one session
through the phases of an answer (text being written, text ended, a whole answer), each
against the baseline in the same phase. The baseline keeps the weights as loaded and the
engine runs on a prepacked copy, so the two alternate run by run in one process: a shared
machine's speed drifts by 20% or more over minutes, and a ratio of runs taken minutes apart
would carry that drift.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from omni2.model import tokens as tk
from omni2.model.bundle import OmniModel
from omni2.model.generate import EndRules
from omni2.model.lm import KVCache

from omni2.streaming.engine.admission import FRAME_S
from omni2.streaming.engine.config import EngineConfig
from omni2.streaming.cpu.threads import DEFAULT_THREADS, in_fresh_thread
from omni2.streaming.engine.engine import Engine
from omni2.streaming.engine.messages import TurnDone, TurnRequest
from omni2.streaming.engine.slots import feed_ids

REALTIME_STEPS_PER_S = 1 / FRAME_S  # 11.72
# Share of a spoken answer's steps in which its text is still being written. Speech runs at
# ~150 words a minute (2.5 words/s) and Qwen2's tokenizer spends ~1.3 tokens a word in
# English, so an answer's text takes ~3.3 steps per 11.72 steps of its speech (28%); the
# text stream runs ahead of the audio and then writes pad_t until the speech ends.
ANSWER_TEXT_SHARE = 0.3
# Step 0's tokens come from the prefill in both loops; rates are timed from step 1 (the first
# decode pass) on, in the baseline and the engine alike.
WARM_STEPS = 1


def random_model(size: str, dtype: torch.dtype, device: str, seed: int = 0) -> OmniModel:
    """The tiny checkpoint, or every part at the released dims with seeded random weights."""
    from omni2.streaming.engine.runtime import ensure_tiny_checkpoint, load_runtime

    if size == "tiny":
        return load_runtime("tiny", device=device, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    from omni2.model.audio_encoder import AudioEncoder
    from omni2.model.config import PRESETS
    from omni2.model.snac_codec import build_snac, prepare_for_inference, real_size_config
    from omni2.model.tiny import random_lm
    from omni2.model.tokenizer import TextTokenizer
    from omni2.model.vision import VisionEncoder

    torch.manual_seed(seed)
    lm = random_lm(PRESETS["mini-omni2"], seed).to(device=device, dtype=dtype)
    audio = AudioEncoder(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12).to(device).eval()
    vision = VisionEncoder().to(device).eval()
    snac = prepare_for_inference(build_snac(real_size_config())).to(device)
    tokenizer = TextTokenizer.from_dir(ensure_tiny_checkpoint())
    return OmniModel(lm=lm, audio_encoder=audio, vision_encoder=vision, tokenizer=tokenizer, snac=snac,
                     name="mini-omni2-random", directory=tempfile.gettempdir())


def question(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.RandomState(seed).randn(int(16000 * seconds))).astype(np.float32)


@torch.inference_mode()
def baseline_turn(model: OmniModel, audio: np.ndarray, steps: int, text_steps: int | None = None) -> tuple[list, float]:
    """Release-style decoding of one turn; returns (audio tokens per step, steps/s).

    text_steps: the text stream is written for this many steps, then ends as if it had
    written eot (pad_t fed back), as a real answer's text ends well before its speech. Random
    weights never write eot by themselves. None: only the model decides."""
    lm = model.lm
    prompt, embeds = model.encode_question(audio)
    T = prompt.length
    dev = embeds.device
    cache = KVCache.allocate(lm.cfg, rows=2, max_len=lm.cfg.block_size, device=dev, dtype=embeds.dtype)
    full = lm.cfg.block_size
    # the prompt in one pass over the whole cache, as every release step attends; its last
    # position gives step 0's tokens
    hidden = lm(embeds, cache, None, torch.arange(T, device=dev)[None].expand(2, T), span=full)
    rules, out, audio_ids, text_id = EndRules(), [], None, None
    t0 = time.perf_counter()
    for step in range(steps):
        if step == WARM_STEPS:  # timed from here: see engine_run
            t0 = time.perf_counter()
        if step > 0:
            ids = torch.tensor(feed_ids(audio_ids, text_id), device=dev)[:, :, None]
            hidden = lm(lm.embed(ids), cache, None, torch.full((2, 1), T + step - 1, device=dev), span=full)
        logits = lm.logits(hidden[:, -1])  # full head, both rows
        audio_ids = [_release_sample(logits[0, tk.audio_slice(a)]) for a in range(tk.N_AUDIO_LAYERS)]
        text_id = _release_sample(logits[1, tk.TEXT_SLICE])
        stop, text_id = rules.apply(step, audio_ids, text_id)
        if stop:
            break
        rules.text_ended = rules.text_ended or (text_steps is not None and step + 1 >= text_steps)
        out.append(audio_ids)
    elapsed = time.perf_counter() - t0
    return out, (len(out) - WARM_STEPS) / elapsed


def _release_sample(logits: torch.Tensor) -> int:
    """top-k 1, softmax, multinomial, read back: the release's greedy path, one token."""
    v, i = torch.topk(logits, 1)
    masked = torch.full_like(logits, float("-inf")).scatter_(-1, i, v)
    return int(torch.multinomial(torch.softmax(masked.float(), -1), 1))


def precision_agreement(size: str, device: str, audio: np.ndarray, steps: int, run_tokens: list) -> dict:
    """How far reduced-precision tokens stay with the fp32 reference (same seeded weights)."""
    from omni2.model.generate import generate

    ref_model = random_model(size, torch.float32, device)
    prompt, embeds = ref_model.encode_question(audio)
    ref = generate(ref_model.lm, prompt, embeds, steps).audio_tokens
    n = min(len(ref), len(run_tokens))
    equal = sum(a == b for r, t in zip(ref[:n], run_tokens[:n]) for a, b in zip(r, t))
    diverge = next((i for i in range(n) if ref[i] != run_tokens[i]), None)
    return {"steps": n, "token_agreement": equal / max(1, 7 * n),
            "first_divergence": "none" if diverge is None else diverge}


@dataclass
class EngineRun:
    sessions: int
    steps_per_s_session: float  # 1 / median time of a decode step with all sessions speaking
    mean_steps_per_s: float  # steps / their time, from step WARM_STEPS on (a whole turn's rate)
    aggregate_steps_per_s: float
    rtf: float  # compute seconds per second of speech in steady state (< 1 keeps up)
    prefill_ms: float
    ttfa_ms: float
    tokens: list


class _EncodedOnce:
    """The model with its question encoder memoised: throughput runs time decoding, not the
    Whisper encoder (which always encodes a 30 s window and would compete for the CPU)."""

    def __init__(self, model: OmniModel, audio: np.ndarray, speech: bool = True) -> None:
        self._model = model
        self._encoded = in_fresh_thread(model.encode_question, audio, threads=DEFAULT_THREADS)
        self.snac = model.snac if speech else None  # None: tokens only, no vocoder work

    def encode_question(self, *args, **kwargs):
        return self._encoded

    def __getattr__(self, name):
        return getattr(self._model, name)


class _TextStepsEngine(Engine):
    """Every turn's text ends after `text_steps` steps (see baseline_turn): benchmark only."""

    def __init__(self, model, config: EngineConfig, text_steps: int) -> None:
        super().__init__(model, config)
        self.text_steps = text_steps

    def _update(self, slot, audio, text) -> None:
        super()._update(slot, audio, text)
        if slot.step >= self.text_steps:
            slot.rules.text_ended = True


def engine_run(model: OmniModel, sessions: int, steps: int, audio: np.ndarray, prefill_chunk: int = 256,
               encode_once: bool = False, speech: bool = True, text_steps: int | None = None) -> EngineRun:
    steps = max(steps, sessions + 8)  # long enough for steps with every session speaking
    cfg = EngineConfig(max_sessions=max(sessions, 1), max_steps=steps, record_tokens=True, prefill_chunk=prefill_chunk,
                       max_queued_turns=max(sessions, EngineConfig.max_queued_turns),  # all submitted at once
                       step_budget_share=0)  # throughput past real time is measured too
    run_model = _EncodedOnce(model, audio, speech) if encode_once else model
    with (Engine(run_model, cfg) if text_steps is None else _TextStepsEngine(run_model, cfg, text_steps)) as eng:
        sids = [eng.open_session() for _ in range(sessions)]
        turns = [eng.submit(TurnRequest(session_id=s, audio_16k=audio, max_steps=steps)) for s in sids]
        dones = []
        for t in turns:
            done = [ev for ev in t.events(timeout=3600) if isinstance(ev, TurnDone)][0]
            if done.reason not in ("completed", "max_steps"):
                raise RuntimeError(f"engine turn ended with {done.reason}: {done.error}")
            dones.append(done)
        # steady state: decode steps in which every session was speaking (a prefill of one
        # session interleaved with the others' steps would otherwise count against them)
        full = [dt for dt, n in zip(eng.step_seconds, eng.step_sessions) if n == sessions]
    if not full:
        # the prompts' prefill spread over so many steps (shared, bounded prefill) that the first
        # answers ended before the last began: the answers must be longer to overlap
        if steps >= 8 * max(sessions + 8, 64):
            raise RuntimeError(f"no decode step had all {sessions} sessions even with {steps} steps an answer")
        return engine_run(model, sessions, 2 * steps, audio, prefill_chunk, encode_once, speech, text_steps)
    step = statistics.median(full)
    return EngineRun(
        sessions=sessions,
        steps_per_s_session=1 / step,
        mean_steps_per_s=len(full) / sum(full),  # decode steps: step 1 on
        aggregate_steps_per_s=sessions / step,
        rtf=step / FRAME_S,
        prefill_ms=1000 * statistics.median(d.stats["prefill_s"] for d in dones),
        ttfa_ms=1000 * statistics.median(d.stats.get("time_to_first_audio_s", float("nan")) for d in dones),
        tokens=dones[0].stats["audio_ids"],
    )


def _median_run(runs: list[EngineRun], key=lambda r: r.aggregate_steps_per_s) -> EngineRun:
    runs = sorted(runs, key=key)
    return runs[len(runs) // 2]


def packed_copy(model: OmniModel) -> OmniModel | None:
    """The model with a prepacked copy of its LM (modules copied, weights shared), so that the
    baseline keeps the weights as loaded while the engine runs packed, in the same process;
    None where prepacking does not apply (GPU, fp16, no oneDNN)."""
    from omni2.streaming.cpu.accelerate import accelerate_

    lm = model.lm
    shared = {id(t): t for t in (*lm.parameters(), *lm.buffers())}
    packed = copy.deepcopy(lm, memo=shared)
    return replace(model, lm=packed) if accelerate_(packed) else None


def _paired(first, second, flip: bool):
    """(first(), second()), run in the other order when flip: alternating the order of the
    runs of a pair cancels a drift of the machine's speed between them."""
    if flip:
        b = second()
        return first(), b
    a = first()
    return a, second()


def run_engine_bench(size: str = "tiny", dtype: str = "fp32", device: str = "cpu", sessions=(1, 2, 4, 8, 16),
                     steps: int = 24, repeats: int = 3, question_s: float = 3.0, prepack: bool = True,
                     text_share: float | None = None, out=print) -> dict:
    """The benchmark (module docstring). Machines drift: the engine and the baseline alternate
    run by run, and each speedup is the median of the paired ratios; the session counts of the
    throughput table are likewise taken round-robin, repeat by repeat."""
    from omni2.streaming.engine.runtime import pick_dtype

    torch.set_grad_enabled(False)
    dt = pick_dtype(dtype, device)
    # Every piece of torch work runs on a short-lived thread (cpu_threads): the engine's step
    # thread and the baseline each get the CPU's only OpenMP team while they run.
    fresh = lambda fn, *a, **k: in_fresh_thread(fn, *a, threads=DEFAULT_THREADS, **k)  # noqa: E731
    out(f"# omni2 bench engine: model={size} dtype={dt} device={device} steps/turn={steps} repeats={repeats} "
        f"torch threads={DEFAULT_THREADS}")
    t0 = time.perf_counter()
    model = fresh(random_model, size, dt, device)
    out(f"model ready in {time.perf_counter() - t0:.1f} s")
    # The baseline runs on the weights as loaded, the release's way; the engine (unless told
    # not to) on a packed copy, as `omni2 serve` runs on a CPU.
    packed = fresh(packed_copy, model) if prepack else None
    engine_model = packed or model
    out(f"engine weights: {'prepacked (oneDNN, few_rows where built)' if packed else 'as loaded'}")
    audio = question(question_s)
    t_enc = []
    for _ in range(repeats):
        t = time.perf_counter()
        fresh(model.encode_question, audio)
        t_enc.append(time.perf_counter() - t)
    steps = max(steps, 9)
    fresh(baseline_turn, model, audio, 3)  # warm-up (allocator, kernels)
    engine_run(engine_model, 1, 3, audio)
    results = {"encode_ms": 1000 * statistics.median(t_enc), "runs": []}
    out(f"question {question_s:.0f} s: encoders+adapters {results['encode_ms']:.0f} ms (median of {repeats})")
    first = _median_run([engine_run(engine_model, 1, steps, audio) for _ in range(repeats)])
    out(f"1 session, question encoded in the turn: prefill {first.prefill_ms:.0f} ms (LM), "
        f"time to first audio {first.ttfa_ms:.0f} ms after submit (encoders + prefill + 4 frames + SNAC)")
    results["ttfa_ms"], results["prefill_ms"] = first.ttfa_ms, first.prefill_ms

    # One session through the phases of an answer: text still being written (every step, as
    # random weights never end it), text ended (from step 1), and a whole answer whose text
    # is written for ANSWER_TEXT_SHARE of its steps. Each against the baseline in that phase.
    share = ANSWER_TEXT_SHARE if text_share is None else text_share
    phases = {"text written": None, "text ended": 1, "whole answer": max(1, round(share * steps))}
    pairs = {name: [] for name in phases}
    for r in range(repeats):
        for name, k in phases.items():
            pairs[name].append(_paired(
                lambda: fresh(baseline_turn, model, audio, steps, text_steps=k),
                lambda: engine_run(engine_model, 1, steps, audio, encode_once=True, speech=False, text_steps=k),
                flip=r % 2 == 1))
    out(f"1 session through an answer (tokens only; the whole answer writes text for {phases['whole answer']} "
        f"of {steps} steps), against release-style decoding in the same state; the two alternate, "
        f"speedup = median of {repeats} paired ratios:")
    results["phases"] = {}
    for name, runs in pairs.items():
        ratios = [e.mean_steps_per_s / rate for (_, rate), e in runs]
        ph = results["phases"][name] = {
            "baseline_steps_per_s": statistics.median(rate for (_, rate), _ in runs),
            "engine_steps_per_s": statistics.median(e.mean_steps_per_s for _, e in runs),
            "speedup": statistics.median(ratios), "paired_ratios": ratios,
            "identical_tokens": all(e.tokens == base for (base, _), e in runs)}
        out(f"  {name:<13} baseline {ph['baseline_steps_per_s']:6.2f} steps/s, engine {ph['engine_steps_per_s']:6.2f}: "
            f"{ph['speedup']:.2f}x (pairs {' / '.join(f'{x:.2f}' for x in ratios)}), "
            f"identical tokens: {ph['identical_tokens']}")
    written = results["phases"]["text written"]
    results["baseline_steps_per_s"] = written["baseline_steps_per_s"]
    results["speedup_1_session"], results["identical_tokens"] = written["speedup"], written["identical_tokens"]
    base_rate = written["baseline_steps_per_s"]
    out(f"baseline (release-style, 1 turn, text written): {base_rate:.2f} steps/s, "
        f"real-time factor {1 / (base_rate * FRAME_S):.2f}")

    out("throughput (question encoded once, so the runs time decoding; session counts taken round-robin); "
        "'speech no' runs")
    out("without the vocoder (on a CPU, streaming SNAC shares the LM's cores; on a GPU it is a small kernel);")
    out("'prefill ms': wall time of the prefill calls a prompt was in (prompts prefilled together each count the whole call):")
    table = {(n, speech): [] for n in sessions for speech in (False, True)}
    for _ in range(repeats):
        for n, speech in table:
            table[n, speech].append(engine_run(engine_model, n, steps, audio, encode_once=True, speech=speech))
    out(f"{'sessions':>8} {'speech':>7} {'steps/s/session':>16} {'aggregate':>10} {'x 1 sess':>9} {'RTF':>6} {'prefill ms':>11}")
    ones = {}
    for (n, speech), runs in table.items():
        run = _median_run(runs)
        one = ones.setdefault(speech, run)
        results["runs"].append(run.__dict__ | {"tokens": None, "speech": speech})
        out(f"{n:>8} {'yes' if speech else 'no':>7} {run.steps_per_s_session:>16.2f} {run.aggregate_steps_per_s:>10.2f} "
            f"{run.aggregate_steps_per_s / one.aggregate_steps_per_s:>9.2f} {run.rtf:>6.2f} {run.prefill_ms:>11.0f}")
    if dt != torch.float32:
        base_tokens = pairs["text written"][0][0][0]
        results["agreement_vs_fp32"] = fresh(precision_agreement, size, device, audio, steps, run_tokens=base_tokens)
        a = results["agreement_vs_fp32"]
        out(f"{dtype} vs fp32 reference tokens: {a['token_agreement']:.1%} of audio tokens equal, "
            f"first divergence at step {a['first_divergence']} of {a['steps']}")
    realtime = [r["sessions"] for r in results["runs"] if r["speech"] and r["steps_per_s_session"] >= REALTIME_STEPS_PER_S]
    results["max_realtime_sessions"] = max(realtime) if realtime else 0
    out(f"most sessions measured that each keep real time (>= {REALTIME_STEPS_PER_S:.2f} steps/s): "
        f"{results['max_realtime_sessions']}")
    return results
