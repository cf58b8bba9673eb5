"""`omni2 bench {model,kernels,engine,arrivals,server,interrupt,soak,gateway}`: benchmarks that print figures.

Each compares against a baseline measured in the same run; speed goals live here, never in
tests. Machines are noisy: every figure is a median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import sys


class _NoArrivalsFlag(argparse.Action):
    """`bench arrivals --arrivals ...` once parsed a choice of one law and read it nowhere: it is
    refused by name, so a run asked for another law is not silently a Poisson one."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--arrivals is not an option: arrivals are always Poisson (open loop; set the mean "
                     "with --rate turns/s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    eng = sub.add_parser("engine", help="engine steps/s at 1..16 sessions vs release-style decoding")
    eng.add_argument("--model", choices=["tiny", "real"], default="tiny",
                     help="tiny checkpoint, or the released dims with random weights")
    eng.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    eng.add_argument("--device", default="cpu")
    eng.add_argument("--sessions", default="1,2,4,8,16")
    eng.add_argument("--steps", type=int, default=24, help="decode steps per turn")
    eng.add_argument("--no-prepack", action="store_false", dest="prepack",
                     help="run the engine on the weights as loaded (no oneDNN packing)")
    eng.add_argument("--repeats", type=int, default=3)
    eng.add_argument("--text-share", type=float, default=None,
                     help="share of a whole answer's steps that write text (default 0.3, see bench_engine.py)")
    arr = sub.add_parser("arrivals", help="turns arriving at random: underruns, first audio, rate held")
    arr.add_argument("--model", choices=["tiny", "real"], default="tiny")
    arr.add_argument("--device", default="cpu")
    arr.add_argument("--sessions", default="8,16")
    # arrivals are always a Poisson process (open loop): a flag naming the law chose nothing
    arr.add_argument("--arrivals", action=_NoArrivalsFlag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    arr.add_argument("--rate", type=float, default=2.0, help="turns/s (with --search: the first rate tried)")
    arr.add_argument("--search", action="store_true", help="find the largest rate held (double, then bisect)")
    arr.add_argument("--bisections", type=int, default=2)
    arr.add_argument("--no-ttfa-target", action="store_false", dest="ttfa_target",
                     help="held = 0 underruns and refusals within 1%% (first audio p99 <= 2x p50 not required)")
    arr.add_argument("--duration", type=float, default=8.0,
                     help="seconds of arrivals per rate at least (and at least --min-turns turns)")
    arr.add_argument("--min-turns", type=int, default=100,
                     help="turns offered per rate at least: the p99 of 100 is the second slowest, not one turn")
    arr.add_argument("--first-audio-factor", type=float, default=2.0,
                     help="admission refuses a new answer whose predicted first audio exceeds this many times "
                          "that of an answer started alone (EngineConfig.first_audio_factor; 0: off)")
    arr.add_argument("--answer-s", type=float, default=4.0, help="seconds of speech per answer")
    arr.add_argument("--question-s", type=float, default=2.0)
    arr.add_argument("--jitter-ms", type=float, default=200.0, help="client playback buffer")
    arr.add_argument("--baseline", action="store_true",
                     help="also measure the one-at-a-time scheduling (EngineConfig.batched_arrivals=False)")
    arr.add_argument("--repeats", type=int, default=1, help="held rate: the median of this many searches")
    arr.add_argument("--stages", action="store_true",
                     help="after each rate, where the admitted turns' first audio went (stage p50/p99, barge-ins) "
                          "and what the slowest met (cyclic collections, other turns starting)")
    arr.add_argument("--modes", default=None,
                     help="scheduling to measure, comma-separated: batched,baseline (default: batched, "
                          "and baseline with --baseline); one alone alternates with the other across locked runs")
    mod = sub.add_parser("model", help="time per decode step of the bare model (tiny and real-size)")
    mod.add_argument("--dtype", default="fp32")
    mod.add_argument("--device", default="cpu")
    mod.add_argument("--repeats", type=int, default=5)
    ker = sub.add_parser("kernels", help="CPU kernels of a decode step (body, greedy heads) vs oneDNN/MKL")
    ker.add_argument("--rows", default="1,2,8,16,64,256", help="rows per product (2 per session)")
    ker.add_argument("--layers", type=int, default=24, help="how many blocks' matrices (24: the whole body)")
    ker.add_argument("--no-heads", action="store_false", dest="heads", help="skip the greedy heads")
    ker.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the body's weights and rows")
    ker.add_argument("--repeats", type=int, default=5)
    srv = sub.add_parser("server", help="WebSocket frames/s vs the raw engine; time to first audio")
    srv.add_argument("--sessions", type=int, default=4)
    srv.add_argument("--turns", type=int, default=3)
    srv.add_argument("--model", default="tiny", help="tiny | real (released sizes, random weights) | checkpoint dir")
    srv.add_argument("--max-steps", type=int, default=256, help="decode steps per answer")
    srv.add_argument("--device", default="auto")
    itr = sub.add_parser("interrupt", help="'stop omni' detector: precision, recall, false stops, latency")
    itr.add_argument("--quick", action="store_true", help="a smaller set (for a smoke run)")
    itr.add_argument("--split", default="test", choices=["test", "tune"], help="held-out voices (test) or tuning ones")
    itr.add_argument("--mode", default="command", choices=["command", "barge_in"])
    itr.add_argument("--sessions", type=int, default=1, help="controllers at once, paced to real time")
    itr.add_argument("--playback", action="store_true", help="the answer is generated before the user speaks")
    itr.add_argument("--context-s", type=float, default=None,
                     help="recognizer mel length in s (8.0 = the setup before batching; default 6.0)")
    itr.add_argument("--baseline", action="store_true",
                     help="the decode schedule before (also every 200-400 ms while the user speaks), to compare")
    itr.add_argument("--max-batch", type=int, default=None,
                     help="windows per recognizer call at most (1 = no batching across sessions)")
    itr.add_argument("--forced", action="store_true",
                     help="also score the phrase teacher-forced at the transcript's end (CommandConfig.forced)")
    itr.add_argument("--speculate-ms", type=int, default=None,
                     help="decode when the level has fallen this long, before the VAD's pause (0: off; default 64)")
    itr.add_argument("--seed", type=int, default=0,
                     help="another draw of the split's voices, styles and conditions (a larger sample: several seeds)")
    itr.add_argument("--verbose", action="store_true", help="one line per clip: what stopped it, or BAD")
    itr.add_argument("--repeat-count", type=int, default=None,
                     help="a phrase read in this many decodes in a row under the threshold stops (DuplexConfig; default 0: off)")
    soak = sub.add_parser("soak", help="server memory (RSS) over minutes of steady load")
    soak.add_argument("--sessions", type=int, default=16, help="clients talking at once")
    soak.add_argument("--minutes", type=float, default=10.0, help="how long they talk")
    soak.add_argument("--warmup-min", type=float, default=None,
                      help="minutes not judged for growth (default: a quarter of the run, at most 2)")
    soak.add_argument("--model", default="tiny", help="omni2 serve --model")
    soak.add_argument("--max-steps", type=int, default=64, help="decode steps per answer")
    soak.add_argument("--turns-per-session", type=int, default=8, help="turns before a client reconnects")
    soak.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    soak.add_argument("serve_args", nargs="*", metavar="-- SERVE_FLAGS",
                      help="more omni2 serve flags, after --")
    gw = sub.add_parser("gateway", help="server CPU per session, sessions held (null engine)")
    gw.add_argument("--sessions", default="8", help="session counts to run, e.g. 8,32,100")
    gw.add_argument("--modes", default="vad,command", help="interrupt modes (omni2 serve --interrupt)")
    gw.add_argument("--workers", default="1,2", help="gateway worker counts (passed only if serve has --workers)")
    gw.add_argument("--model", default="null", help="omni2 serve --model (null: no model time)")
    gw.add_argument("--span", type=float, default=8.0, help="seconds of each CPU window")
    gw.add_argument("--warm", type=float, default=3.0, help="seconds after the ramp before measuring")
    gw.add_argument("--procs", type=int, default=0, help="load processes (default: the CPU count, at most 8)")
    gw.add_argument("--question-every", type=float, default=2.0,
                    help="active load: seconds of quiet after an answer before the next question")
    gw.add_argument("--serve-cmd", default=None, help="the omni2 serve to measure (default: this one)")
    gw.add_argument("serve_args", nargs="*", metavar="-- SERVE_FLAGS", help="more omni2 serve flags, after --")
    for q in (eng, arr, mod, ker, srv, itr, soak, gw):
        q.add_argument("--json", help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    from omni2.streaming.engine.runtime import UnsupportedDtype

    try:
        result = _run(args)
    except UnsupportedDtype as exc:  # (bf16 on a CPU without it: one line, not a traceback)
        print(f"omni2 bench {args.bench}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


def _run(args: argparse.Namespace) -> dict:
    if args.bench == "engine":
        from omni2.clients.tools.bench_engine import run_engine_bench

        result = run_engine_bench(size=args.model, dtype=args.dtype, device=args.device,
                                  sessions=tuple(int(s) for s in args.sessions.split(",")),
                                  steps=args.steps, repeats=args.repeats, prepack=args.prepack,
                                  text_share=args.text_share)
    elif args.bench == "arrivals":
        from omni2.clients.tools.bench_arrivals import run_arrivals_bench

        result = run_arrivals_bench(size=args.model, device=args.device,
                                    sessions=tuple(int(s) for s in args.sessions.split(",")), rate=args.rate,
                                    search=args.search, duration_s=args.duration, answer_s=args.answer_s,
                                    question_s=args.question_s, jitter_ms=args.jitter_ms,
                                    bisections=args.bisections, ttfa_target=args.ttfa_target,
                                    baseline=args.baseline, repeats=args.repeats,
                                    modes=args.modes.split(",") if args.modes else None,
                                    min_turns=args.min_turns, first_audio_factor=args.first_audio_factor,
                                    stages=args.stages)
    elif args.bench == "model":
        from omni2.clients.tools.bench_model import run_model_bench

        result = run_model_bench(dtype=args.dtype, device=args.device, repeats=args.repeats)
    elif args.bench == "kernels":
        import torch

        from omni2.clients.tools.bench_kernels import run_kernel_bench

        result = run_kernel_bench(rows=tuple(int(r) for r in args.rows.split(",")), layers=args.layers,
                                  repeats=args.repeats, heads=args.heads,
                                  dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    elif args.bench == "gateway":
        from omni2.clients.tools.gateway_bench import main_args as gateway_main

        result = gateway_main(args)
    elif args.bench == "soak":
        from omni2.clients.tools.soak import main_args

        result = main_args(args)
    elif args.bench == "server":
        from omni2.clients.tools.bench_server import run_server_bench

        result = run_server_bench(runtime_model=args.model, sessions=args.sessions, turns=args.turns,
                                  max_steps=args.max_steps, device=args.device)
    else:
        from omni2.clients.tools.bench_interrupt import run_interrupt_bench

        result = run_interrupt_bench(split=args.split, mode=args.mode, seed=args.seed, verbose=args.verbose,
                                     quick=args.quick, playback=args.playback,
                                     sessions=args.sessions, context_s=args.context_s, max_batch=args.max_batch,
                                     baseline=args.baseline, forced=args.forced, speculate_ms=args.speculate_ms,
                                     repeat_count=args.repeat_count)
    return result
