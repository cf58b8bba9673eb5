"""Every engine limit and default in one frozen object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Decode steps of one answer unless it asks for fewer (one step = one 85.3 ms speech frame:
# 87 s of speech); the engine's cap, a turn's default and the server's max_output_tokens cap.
DEFAULT_MAX_STEPS = 1024


@dataclass(frozen=True)
class EngineConfig:
    # Concurrency: one session owns one slot (2 KV-cache rows) for its whole life.
    max_sessions: int = 16
    # Context positions per session (<= the model's block size; None = the block size).
    max_context: Optional[int] = None
    # Prefill is cut into chunks so one long question never stalls running answers for long.
    prefill_chunk: int = 256
    # Arriving turns are worked on together (streaming/engine/prefill.py): up to `encode_batch`
    # questions waiting for the encoders run as one Whisper / CLIP batch, and up to
    # `prefill_turns` prompts share a step's prefill. While answers play, a step prefills the
    # positions that fit the time its decode step leaves of the budget (step_budget_share),
    # at least `prefill_min_positions`, at most `prefill_step_positions`.
    encode_batch: int = 8
    prefill_turns: int = 8
    prefill_min_positions: int = 32
    prefill_step_positions: int = 512
    # False: the one-at-a-time scheduling kept as the benchmarks' baseline: one question per
    # encoder call, one `prefill_chunk` of one prompt a step whatever plays, and admission that
    # scales every step linearly (no fixed + per-answer fit).
    batched_arrivals: bool = True
    # Turns waiting for a slot/prefill; beyond this, submit() refuses (no unbounded buffering).
    max_queued_turns: int = 64
    # Default cap on decode steps of one answer (one step = one 85.3 ms speech frame).
    max_steps: int = DEFAULT_MAX_STEPS
    # Streaming SNAC: decode every `audio_group_frames` new frames (4 = 341 ms of speech).
    audio_group_frames: int = 4
    # Every SNAC window is exactly this wide (3 context + ~2.6 held-back + ~18.4 new frames at
    # 24; the first ones of an answer end in filler frames), so the windows of all answers
    # batch in one call (streaming/engine/vocoder.py); 0: a window takes every frame that waits.
    audio_window_frames: int = 24
    # Frames in one batched SNAC call at most (4 windows of 24; one window always goes).
    audio_batch_frames: int = 96
    # Recent step/TTFA timings kept for stats and metrics.
    timing_window: int = 512
    # Seed of the sampler's generator (non-greedy sessions only).
    seed: int = 0
    # torch.compile the decode step: "" (off), "default", or "reduce-overhead" (CUDA graphs).
    # Batch rows are padded to a power of two and the attended span to a multiple of
    # `compile_span_bucket`, so only a handful of shapes ever get compiled. Meant for GPUs: on
    # the 2-core CPU the compiled real-size fp32 forward took 202 ms vs 79 ms eager (cause not
    # investigated).
    compile: str = ""
    # Also on a GPU without compile, decode steps attend to a span rounded up to this bucket:
    # cuDNN's attention builds a plan for every new shape (~3 ms of CPU time a layer on an
    # H200, 70 ms a step when the span grew by one every step); masked positions cost little.
    compile_span_bucket: int = 256
    # CPU only (streaming/cpu/threads.py): torch threads of the decode step and of the
    # encoders' short-lived threads (0: by the model's width, threads.model_threads: one for a
    # model narrower than 256, like the tiny one, else the process default, one per core). The vocoder
    # runs single-threaded: it holds no OpenMP team that would slow every decode step (a
    # 2-thread SNAC on short-lived threads measured the same: 58.1 vs 57.2 steps/s, 8 sessions).
    threads: int = 0
    # Admission on measured headroom (streaming/engine/admission.py): a new answer is refused while
    # the predicted decode step with it would take more than this share of the 85.3 ms frame
    # (the rest is left to prefill and encoders); answers playing are never slowed for it.
    # 0: slots only (benchmarks that measure throughput past real time).
    step_budget_share: float = 0.8
    # Admission on the first-audio wait (streaming/engine/admission.py, FirstAudioHeadroom): a new
    # answer is refused while its predicted first audio, behind the answers starting now, would
    # exceed this many times the first audio of an answer started alone (2 in `omni2 bench
    # arrivals`). 0: not bounded, the default: a burst of questions submitted at once (tests,
    # `bench engine`, a server's first turns) would otherwise be refused all but one.
    first_audio_factor: float = 0.0
    # Refused turns are told to try again after this long.
    busy_retry_after_s: float = 1.0
    # Put every sampled id in TurnDone.stats (tests and `omni2 bench`; off in production).
    record_tokens: bool = False
    # CPU only (streaming/cpu/malloc.py): the heap keeps SNAC's freed buffers for reuse; these
    # bound what it keeps. At most this many malloc arenas (0: glibc's 8 per core), and free
    # heap pages handed back to the kernel this often (0: never). Measured in `omni2 bench soak`.
    malloc_arena_max: int = 2
    malloc_trim_interval_s: float = 10.0
    # At start, everything alive (the model, the libraries) leaves the cyclic collector's scans
    # (collector.py: a full collection of them stopped every thread for 156-305 ms).
    freeze_long_lived: bool = True

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: the process default)")
        if not 0 <= self.step_budget_share <= 1:
            raise ValueError("step_budget_share must be in [0, 1] (0: no headroom check)")
        if self.first_audio_factor != 0 and self.first_audio_factor < 1:
            raise ValueError("first_audio_factor must be 0 (off) or >= 1")
        if self.malloc_arena_max < 0 or self.malloc_trim_interval_s < 0:
            raise ValueError("malloc_arena_max and malloc_trim_interval_s must be >= 0 (0: off)")
        if min(self.encode_batch, self.prefill_turns, self.prefill_min_positions) < 1 or \
                self.prefill_step_positions < self.prefill_min_positions:
            raise ValueError("encode_batch, prefill_turns, prefill_min_positions must be >= 1 and "
                             "prefill_step_positions >= prefill_min_positions")
        if self.prefill_chunk < 1 or self.audio_group_frames < 1 or self.max_steps < 1:
            raise ValueError("prefill_chunk, audio_group_frames and max_steps must be >= 1")
        if self.audio_window_frames < 0 or self.audio_batch_frames < 1:
            raise ValueError("audio_window_frames must be >= 0 and audio_batch_frames >= 1")
