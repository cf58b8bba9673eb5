"""Per-session duplex controller: listens to the user while the assistant answers.

One DuplexController per session, a listening.detector.Detector that decides interrupts.
The server feeds it every microphone packet (`feed_input`, or its two halves around a
batched VAD score) and every assistant audio chunk it sends (`feed_output`), tells it when
an answer starts and ends (`set_speaking`), and acts on the `Heard` events it returns:

- kind "speech_started" | "speech_stopped" (| "speech_paused" | "speech_resumed"): turn
  detection, on the echo-cancelled signal (OpenAI server-VAD semantics, see vad.py);
- kind "interrupt", reason "command" | "barge_in" | "model": cancel the answer now.

Flow inside feed_input: microphone -> EchoCanceller (removes what the client is playing)
-> SpeechDetector in 32 ms chunks -> while the assistant is audible, the CommandDetector
decodes the latest window where a command can end: when a pause starts (and every
`pause_hop_ms` into it while the last decode held part of a phrase). A command is a short
utterance followed by a pause, so decoding while the user speaks (`schedule="hops"`, every
`hop_ms`) bought little and cost ~2x the decodes: with 4 sessions on 2 cores the backlog
it built cost more latency than it saved. In barge-in mode any speech of `barge_in_ms`
stops. The recognizer is shared by the process's sessions: windows handed in together are
decoded in one call, and pause decodes go before routine hops (see interrupt.WhisperRecognizer).

A matched command fires only once it is final: the user paused for `confirm_pause_ms`,
or a window decoded `confirm_decode_ms` later still ends with the phrase. That is what
keeps "stop on my | way" from stopping anything. The decode need not wait for that pause
(`speculate_ms`): the level falls ~35 ms after the last word, the VAD's probability only
100-220 ms after it, so a fall that lasts 64 ms starts the decode and its match waits for
the VAD; the decode's time then overlaps the VAD's lag instead of adding to it.

`feed_input` runs the recognizer inline (tens of ms on CPU): call it from a worker thread
(e.g. `await asyncio.to_thread(ctl.feed_input, pcm)`), never on the event loop.

Server integration (one controller per session; construct once, it loads silero-vad and
shares one whisper model per process):
    ctl = DuplexController(DuplexConfig(mode="command"))     # or mode="barge_in"
    on response start:        ctl.set_speaking(True)
    on every audio delta:     ctl.feed_output(pcm_24k_float32)  (right when it is sent)
    on response end:          ctl.set_speaking(False)           (audio may still be playing)
    on input_audio_buffer.append: for ev in ctl.feed_input(pcm_16k_float32): ...
    engine text tokens (only if the checkpoint has interrupt tokens): ctl.on_model_tokens(ids)
On an interrupt: turn.cancel(), stop sending audio deltas, emit speech_started and
response.done(status="cancelled"); truncate the stored answer at `played_ms`
(conversation.item.truncate audio_end_ms). reason "command": the user's current speech
was the command, so clear it at its speech_stopped instead of answering it.
reason "barge_in": the speech goes on and becomes the next question as usual.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

import numpy as np

from ..audio import REALTIME_SAMPLE_RATE, Resampler
from .detector import Detector, Heard
from .echo import EchoCanceller, EchoConfig
from .interrupt import CommandConfig, CommandDetector
from .recent import RecentSamples
from .vad import CHUNK, SAMPLE_RATE, SileroStream, SpeechDetector, score_streams

Mode = Literal["command", "barge_in"]


@dataclass(frozen=True)
class DuplexConfig:
    """Every threshold of the listening side (one object per session)."""

    mode: Mode = "command"
    # Turn detection (OpenAI turn_detection.server_vad fields).
    vad_threshold: float = 0.5
    silence_ms: int = 500
    prefix_padding_ms: int = 300
    min_speech_ms: int = 64
    pause_ms: Optional[int] = None  # VAD speech_paused/resumed events (see vad.SpeechDetector)
    # Barge-in mode: user speech at least this long stops the answer.
    barge_in_ms: int = 300
    barge_in_gap_ms: int = 200   # a pause this long restarts the barge-in speech count
    barge_in_echo_db: float = 6.0  # speech the canceller took more than this out of is echo
    barge_in_settle_ms: int = 1000  # after finding the echo path, its filter converges this long
    # Command mode: decoding schedule and window.
    command: CommandConfig = field(default_factory=CommandConfig)
    # "pauses": decode where a command ends (a pause starts, and its first moments while
    # the last decode held part of a phrase), plus one check when speech resumes after a
    # match. "hops": also every hop_ms / hop_idle_ms while the user speaks (the schedule
    # before; it found a command a little before the pause, but 4 sessions' hops need more
    # than 2 cores, and under load the backlog cost far more latency than the hops saved).
    schedule: Literal["pauses", "hops"] = "pauses"
    # "pauses" in a segment held open past foreground_min_ms (another talker, echo residue
    # keeping the VAD up, so a pause may only show as a level drop): a hop this often.
    # 0: none.
    held_hop_ms: int = 0
    # "pauses": a pause this soon after a decode that held no part of a phrase is decoded
    # only once this much has passed since (and if it still lasts): the whole phrase would
    # have to fit in the audio since, which takes longer to say, and the word gaps of
    # ordinary talk, every few hundred ms, are over by then. 0: every pause at once.
    pause_idle_ms: int = 300
    hop_ms: int = 200            # decode period while the user is speaking ("hops")
    # ... once the last decode ended with no part of a phrase: the whole phrase would have
    # to be in the audio since, and a phrase takes longer than this to say.
    hop_idle_ms: int = 400
    pause_prob: float = 0.5      # a chunk under this speech probability starts a pause
    pause_drop_db: float = 10.0  # ... or a chunk this far under the last chunks' peak
    # Any segment: the level staying pause_drop_db under the last chunks' peak this long
    # starts the decode before the VAD's pause (the level falls ~35 ms after the last word,
    # the VAD's probability under pause_prob ~100-220 ms after it); a match it finds still
    # fires only at the VAD's pause (or once a later window confirms it), so the decode runs
    # while the VAD catches up instead of after it. Shorter falls (a nasal, a stop's
    # closure) come and go inside words. 0: off.
    speculate_ms: int = 64
    pause_hop_ms: int = 96       # decode period in the first moments of a pause
    pause_follow_ms: int = 300   # how long into a pause decoding continues
    max_decode_share: float = 0.5    # decoding may take this share of real time on average
    # True: a decode batched with other sessions costs only its part of the call (for a GPU,
    # where a batch costs about one window); False: the wall time it waited, which keeps a
    # CPU that cannot keep up from building a backlog (measured: p90 4.3 s with True).
    charge_share: bool = False
    decode_bank_ms: int = 400        # ... with bursts up to this much compute
    hop_reserve_ms: int = 150        # compute kept for pause decodes when hops would eat it
    # A matched command fires once the user pauses this long: 32 ms is the chunk whose low
    # speech probability started the decode, so a match found at a pause fires at once
    # (64 waited one chunk more, and behind that decode: ~40 ms of latency, no false stop
    # fewer on the tune split).
    confirm_pause_ms: int = 32
    confirm_decode_ms: int = 160     # ... or when a window this much later still ends with it
    threshold_speaking: float = 1.01  # confidence that fires without waiting (>1: never)
    # A phrase read at the end of repeat_count decodes in a row (the decodes of one pause,
    # each with a little more silence after the words) with at least repeat_threshold
    # confidence each is a match, though none reached command.threshold. 0: off (default).
    # Chosen on the tune split (issue 18): whisper's readings of a command under echo
    # waver under the threshold ("Stop Omni." 0.35-0.49 three times) where ordinary speech
    # ending like the phrase was read so once or twice ("shop on my way home": 0.40, 0.35);
    # tune, 4 sessions: R 0.833 / P 1.000 vs 0.792 / 1.000 without. But on the held-out
    # split (one run each, `bench interrupt --sessions 4 --repeat-count 3`) it fired on
    # the assistant's echo before the user's command (P 0.953 / R 0.854 vs 0.977 / 0.875,
    # playback P 0.952 / R 0.833): repeats do not tell a wavering command from echo.
    repeat_count: int = 0
    repeat_threshold: float = 0.3
    foreground_min_ms: int = 1500    # segments longer than this get a foreground window
    foreground_db: float = 8.0       # "louder than the segment's typical chunk" margin
    foreground_gap_ms: int = 250     # quiet inside the user's words this long is allowed
    foreground_min_shift_ms: int = 300
    foreground_keep_db: float = 3.0  # frames this close to "loud" are kept as they are
    foreground_duck_db: float = -25.0  # the rest (the other talker) is pushed down this much
    min_gap_ms: int = 64         # no two decodes closer than this
    window_lead_ms: int = 200    # audio kept before the speech onset in a window
    min_window_ms: int = 400     # shorter speech cannot hold a two-word command
    # VAD threshold while the assistant is audible (the canceller's gate already removes
    # echo residue, so by default the same).
    vad_threshold_playing: float = 0.5
    echo: EchoConfig = field(default_factory=EchoConfig)
    # Listen for interrupts only while an answer is being generated or still playing.
    listen_when_idle: bool = False
    # Model interrupt path: token ids the checkpoint emits on its text stream to stop
    # itself. Empty for the released Mini-Omni2 weights (they have none).
    model_interrupt_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in ("command", "barge_in"):
            raise ValueError(f"duplex mode must be 'command' or 'barge_in', got {self.mode!r}")
        if self.hop_ms < 32 or self.barge_in_ms < 0:
            raise ValueError("hop_ms must be >= 32 and barge_in_ms >= 0")
        if self.schedule not in ("pauses", "hops"):
            raise ValueError(f"duplex schedule must be 'pauses' or 'hops', got {self.schedule!r}")
        if self.held_hop_ms and self.held_hop_ms < 32:
            raise ValueError("held_hop_ms must be 0 (no hops) or >= 32")


FRAME = 256  # 16 ms level frames for the foreground window


def foreground(window: np.ndarray, cfg: DuplexConfig) -> np.ndarray | None:
    """The loud tail of `window` with quieter frames attenuated, or None if there is none.

    "Loud" is `foreground_db` above the window's 40th-percentile frame level; the tail
    starts at the earliest loud frame reachable backwards from the end without a quiet
    gap longer than `foreground_gap_ms`.
    """
    n = window.size // FRAME
    if n < 8:
        return None
    frames = window[window.size - n * FRAME :].reshape(n, FRAME).astype(np.float64)
    level = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    floor = float(np.percentile(level, 40))
    loud = level >= floor + cfg.foreground_db
    if not loud.any():
        return None
    gap_limit = max(1, cfg.foreground_gap_ms * SAMPLE_RATE // 1000 // FRAME)
    first, gap = None, 0
    for i in range(n - 1, -1, -1):
        if loud[i]:
            first, gap = i, 0
        elif first is not None:
            gap += 1
            if gap > gap_limit:
                break
    lead = cfg.window_lead_ms * SAMPLE_RATE // 1000 // FRAME
    begin = max(0, first - lead)
    if begin * FRAME < cfg.foreground_min_shift_ms * SAMPLE_RATE // 1000:
        return None  # the loud part is the whole window: the first window covers it
    if (n - begin) * FRAME < cfg.min_window_ms * SAMPLE_RATE // 1000:
        return None
    keep = level[begin:] >= floor + cfg.foreground_db - cfg.foreground_keep_db
    keep = keep | np.roll(keep, 1) | np.roll(keep, -1)  # keep word edges
    gain = np.where(keep, 1.0, 10.0 ** (cfg.foreground_duck_db / 20.0))
    ramp = np.repeat(gain, FRAME)
    smooth = np.convolve(ramp, np.ones(64) / 64, mode="same")  # 4 ms ramps, no clicks
    out = frames[begin:].reshape(-1) * smooth
    return out.astype(np.float32)


class DuplexController(Detector):
    decides_interrupts = True

    def __init__(self, config: DuplexConfig = DuplexConfig(), detector: CommandDetector | None = None):
        self.config = config
        self.vad = SpeechDetector(
            threshold=config.vad_threshold, silence_ms=config.silence_ms,
            prefix_padding_ms=config.prefix_padding_ms, min_speech_ms=config.min_speech_ms,
            pause_ms=config.pause_ms,
        )
        self.echo = EchoCanceller(config.echo)
        self.detector = None
        if config.mode == "command":
            self.detector = detector or CommandDetector(config.command)
        self._ms = SAMPLE_RATE // 1000
        self._tracing = False
        self.reset()

    def reset(self) -> None:
        """Forget the session's audio (sample indices restart at 0)."""
        self.vad.reset()
        self.echo.reset()
        # The windowed-sinc filter (~2 ms of lag), not libsoxr (~22 ms): the echo reference
        # sets the playout timeline, whose end says what the user has heard.
        self._resampler = Resampler(REALTIME_SAMPLE_RATE, SAMPLE_RATE, backend="sinc")
        keep = int(self.config.command.window_s * SAMPLE_RATE) + self.config.window_lead_ms * self._ms + CHUNK
        self._clean = RecentSamples(keep)              # cleaned audio kept for windows
        self._vad_pending = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self._answer_start: int | None = None  # playout sample where this answer starts
        self._segment_start: int | None = None
        self._speech_run = 0          # samples of speech in the current segment
        self._last_decode = -(1 << 30)
        self._levels: list[float] = []   # dB of the last few chunks
        self._pause_len = 0              # samples since the current pause began (0: talking)
        self._early_len = 0              # ... or since the level fell (speculate), whichever began first
        self._fall_len = 0               # samples since the level fell pause_drop_db (0: not fallen)
        self._drop_ref = 0.0             # dB it fell from
        # A matched command waiting for confirmation by a pause or a later window:
        # (phrase, confidence, transcript, sample of the first match, confirmed).
        self._pending: tuple | None = None
        self._promising = False          # the last decode ended with (part of) a phrase
        self._repeats = 0                # decodes in a row that ended with a phrase (repeat_threshold)
        self._credit = self.config.decode_bank_ms / 1000  # seconds of decoding allowed now
        self._calibrated_seen: int | None = None
        self._interrupted = False
        self.decodes = 0
        self.skipped = 0                 # decodes the compute budget did not allow
        self.decode_seconds: list[float] = []  # recent decode compute times (metrics)
        # Set to a list to record every decode as (end sample, transcript, confidence).
        self.trace: list | None = [] if self._tracing else None

    # ------------------------------------------------------------------ server inputs
    def set_speaking(self, speaking: bool) -> None:
        """An answer started (True) or finished generating (False; it may still play)."""
        if speaking and not self.speaking:
            self._answer_start = None
            self._interrupted = False
        self.speaking = bool(speaking)

    def feed_output(self, pcm_24k: np.ndarray) -> None:
        """Assistant audio just sent to the client (float32, 24 kHz)."""
        x = self._resampler.process(np.asarray(pcm_24k, dtype=np.float32))
        if x.size:
            start = self.echo.add_reference(x, self.echo.samples_in)
            if self._answer_start is None:
                self._answer_start = start

    def on_model_tokens(self, token_ids: Iterable[int]) -> Heard | None:
        """Text-stream tokens from the engine; honours model interrupt tokens if configured."""
        stop = set(self.config.model_interrupt_token_ids)
        if not stop or self._interrupted:
            return None
        for token in token_ids:
            if int(token) in stop:
                return self._interrupt("model", None, 1.0, self.echo.samples_in, "")
        return None

    def audible(self, at: int | None = None) -> bool:
        """Whether an answer is being generated or its audio is still playing at `at`."""
        at = self.echo.samples_in if at is None else at
        return self.speaking or self.echo.playout_end > at

    def may_decode(self) -> bool:
        """Whether the next audio may run the command recognizer (tens of ms of CPU)."""
        return self.detector is not None and (self.audible() or self.config.listen_when_idle)

    def played_ms(self, at: int | None = None) -> int:
        """Milliseconds of this answer's audio the client had played by sample `at`."""
        if self._answer_start is None:
            return 0
        at = self.echo.samples_in if at is None else at
        return max(0, min(at, self.echo.playout_end) - self._answer_start) // self._ms

    # -------------------------------------------------------------------- microphone
    @property
    def stream(self) -> SileroStream:
        return self.vad.stream

    def feed_input(self, samples_16k: np.ndarray) -> list[Heard]:
        """Process microphone audio (float32, 16 kHz, any length); events in order."""
        chunks = self.prepare_input(samples_16k)
        if chunks.shape[0] == 0:
            return []
        return self.consume_input(chunks, score_streams([self.vad.stream], [chunks])[0])

    def prepare_input(self, samples_16k: np.ndarray) -> np.ndarray:
        """First half of feed_input: echo-cancel and keep the audio; the whole 512-sample
        chunks (k x 512) for the VAD to score (vad.score_streams, batched with others)."""
        clean = self.echo.process(samples_16k)
        self._keep(clean)
        x = np.concatenate([self._vad_pending, clean]) if self._vad_pending.size else clean
        n = (x.size // CHUNK) * CHUNK
        self._vad_pending = x[n:].copy()
        return np.ascontiguousarray(x[:n]).reshape(-1, CHUNK)

    def consume_input(self, chunks: np.ndarray, probs) -> list[Heard]:
        """Second half of feed_input: the chunks from prepare_input with their speech
        probabilities; runs the listener (and any command decode) chunk by chunk."""
        events: list[Heard] = []
        # Each chunk's mean power, all in one call (per row the same sum as one chunk's mean).
        powers = np.mean(np.asarray(chunks, dtype=np.float64).reshape(-1, CHUNK) ** 2, axis=1)
        for chunk, prob, power in zip(chunks, probs, powers):
            events += self._chunk(chunk, float(prob), float(power))
        return events

    def _keep(self, clean: np.ndarray) -> None:
        self._clean.append(clean)

    def _chunk(self, chunk: np.ndarray, prob: float, power: float) -> list[Heard]:
        cfg = self.config
        start = self.vad.samples_seen
        end = start + CHUNK
        playing = self.echo.playing(start, end)
        self.vad.threshold = cfg.vad_threshold_playing if playing else cfg.vad_threshold
        events: list[Heard] = self.vad.consume_input(chunk[None], (prob,))
        voiced = prob >= self.vad.threshold
        level = 10.0 * np.log10(power + 1e-12)
        if voiced and self._segment_start is None:
            # Decoding may begin before min_speech_ms confirms the onset.
            self._segment_start = max(0, start - cfg.window_lead_ms * self._ms)
        if voiced and not (cfg.mode == "barge_in" and playing and self._echo_like(start, end)):
            self._speech_run += CHUNK
        # A pause: the VAD lets go, or, in a long segment (another talker or echo residue
        # holding the VAD up), the level falls well under the last few chunks' peak.
        recent = max(self._levels[-5:], default=level)
        self._levels = self._levels[-5:] + [level]
        held = self._segment_start is not None and end - self._segment_start >= cfg.foreground_min_ms * self._ms
        drop = level < recent - cfg.pause_drop_db
        paused = prob < cfg.pause_prob or (held and drop)
        if drop and not self._fall_len:
            self._drop_ref = recent
        # A fall lasts while the level stays under where it fell from, so that the VAD's
        # pause, once it comes, continues it instead of starting a second decode.
        falling = drop or (self._fall_len > 0 and level < self._drop_ref - cfg.pause_drop_db)
        self._fall_len = self._fall_len + CHUNK if falling else 0
        early = paused or (0 < cfg.speculate_ms <= self._fall_len // self._ms)
        # Decoding may use up to max_decode_share of real time, banked up to decode_bank_ms.
        self._credit = min(self._credit + cfg.max_decode_share * CHUNK / SAMPLE_RATE, cfg.decode_bank_ms / 1000)
        self._pause_len = self._pause_len + CHUNK if paused else 0
        self._early_len = self._early_len + CHUNK if early else 0
        if cfg.mode == "barge_in" and self._pause_len >= cfg.barge_in_gap_ms * self._ms:
            self._speech_run = 0  # barge-in wants one stretch of speech, not scattered blips
        quiet = not (voiced or self.vad.in_speech or self.vad.onset_pending)
        if quiet and self._pending is None:
            self._segment_start = None  # blip over or speech_stopped: next speech is new
            self._speech_run = 0
            self._repeats = 0
        listening = (self.audible(end) or cfg.listen_when_idle) and not self._interrupted
        if not listening or self._segment_start is None:
            return events
        if cfg.mode == "barge_in":
            if self._speech_run >= cfg.barge_in_ms * self._ms:
                if self.echo.echo_suspected(self._segment_start, end):
                    # Our own voice before the canceller locked on: start counting afresh.
                    self._speech_run = 0
                else:
                    events.append(self._interrupt("barge_in", None, prob, end, ""))
            return events
        trigger = self._trigger(end, early, held)
        # Under load, pauses (where commands end) keep a reserve that hops may not spend.
        reserve = cfg.hop_reserve_ms / 1000 if trigger == "hop" else 0.0
        if trigger == "check":
            reserve = -1.0  # a pending stop is always checked, even when over budget
        if trigger is not None and self._credit <= reserve:
            self.skipped += 1
        elif trigger is not None:
            t0 = time.perf_counter()
            decoded = self._decode(end, trigger)
            spent = time.perf_counter() - t0
            share = getattr(getattr(self.detector, "recognizer", None), "last_share_s", None)
            if decoded and cfg.charge_share and share is not None:
                # Batched with other sessions' windows: this session pays its part of the call.
                spent = min(spent, share())
            self._credit -= spent
            if decoded:
                self.decode_seconds.append(spent)
                del self.decode_seconds[:-256]
        if self._pending is not None:
            phrase, confidence, text, _, confirmed = self._pending
            # A later window's confirmation counts unless the VAD clearly hears the user
            # still talking (whisper may not have caught the next word yet).
            if ((confirmed and (not voiced or held)) or self._pause_len >= cfg.confirm_pause_ms * self._ms
                    or confidence >= cfg.threshold_speaking):
                self._pending = None
                events.append(self._interrupt("command", phrase, confidence, end, text))
        return events

    def _trigger(self, end: int, early: bool, held: bool) -> str | None:
        """Why the chunk ending at `end` decodes: "check" (a pending match, with new audio
        after it), "pause" (where a command ends), "hop" (routine, while the user speaks), or
        None. `early`: a pause has begun (the VAD's, or a fall in level); `held`: the segment
        is long (another talker or echo residue may keep the VAD up)."""
        cfg = self.config
        since = end - self._last_decode
        ms = self._ms
        pause_len = self._early_len  # decodes start at the first sign of a pause
        # How far into the pause follow-up decodes are: from the VAD's pause when there is
        # one. A fall can begin inside the command's last word (a quiet "-ni" stays under
        # where "stop" fell from) and by the VAD's pause already be past pause_follow_ms,
        # which left no decode with silence after the word (echo clip "stop omni": 0.49
        # at the pause, then nothing).
        follow_len = self._pause_len or pause_len
        if self._pending is not None and self._pause_len >= cfg.confirm_pause_ms * ms:
            return None              # a match waiting for this pause: it fires in _chunk, no decode
        if (self._pending is not None and end - self._pending[3] >= cfg.confirm_decode_ms * ms
                and since >= cfg.pause_hop_ms * ms):
            return "check"           # did the user go on talking after the phrase?
        if pause_len == CHUNK and since >= cfg.min_gap_ms * ms and (
                cfg.schedule == "hops" or self._promising or since >= cfg.pause_idle_ms * ms):
            return "pause"           # a pause just began: the usual end of a command
        if (self._pause_len == CHUNK < pause_len and since >= cfg.pause_hop_ms * ms
                and (self._promising or since >= cfg.pause_idle_ms * ms)):
            # The VAD lets go inside a fall that began earlier (a quieter last word, "STOP
            # omni", keeps the level under where it fell from): the fall's decodes may have
            # read the last word unfinished, so the VAD's pause gets its own decode.
            return "pause"
        if (cfg.schedule == "pauses" and 0 < pause_len <= cfg.pause_follow_ms * ms
                and self._last_decode < end - pause_len + CHUNK and since >= cfg.pause_idle_ms * ms):
            return "pause"           # a pause too soon after an idle decode lasted: not a word gap
        if (0 < follow_len <= cfg.pause_follow_ms * ms and since >= cfg.pause_hop_ms * ms
                and self._promising and self._pending is None):
            return "pause"           # the phrase was under way: its last word may now be done
        if not early and self._pending is None and since >= self._hop_period(held) * ms:
            return "hop"
        return None

    def _hop_period(self, held: bool) -> float:
        """Milliseconds between routine decodes while the user speaks (inf: none)."""
        cfg = self.config
        if cfg.schedule == "hops":
            return cfg.hop_ms if self._promising else max(cfg.hop_ms, cfg.hop_idle_ms)
        return cfg.held_hop_ms if held and cfg.held_hop_ms else float("inf")

    def _echo_like(self, start: int, end: int) -> bool:
        """Barge-in: whether a voiced chunk is likely our own voice rather than the user.

        Either the canceller removed most of it, or it only just found the echo path (its
        filter is still converging, so what is left may be echo); a new echo path also
        restarts the speech count, which may have been fed by uncancelled echo.
        """
        cfg = self.config
        if self.echo.calibrated_at != self._calibrated_seen:
            self._calibrated_seen = self.echo.calibrated_at
            self._speech_run = 0
        at = self.echo.calibrated_at
        if at is not None and end - at < cfg.barge_in_settle_ms * self._ms:
            return True
        return self.echo.removed_db(start, end) > cfg.barge_in_echo_db

    def _windows(self, end: int) -> list[np.ndarray]:
        """Audio to decode: the segment's window, plus a foreground window when useful.

        Under a steady other talker (or echo residue) the segment began long before the
        user spoke, and whisper transcribes the earlier voice. The user, nearer the mic,
        is louder: the latest run of frames well above the window's typical level marks
        where they started. The second window starts there and has the quieter frames
        (the other talker between the user's words) pushed down, like an expander.
        """
        cfg = self.config
        kept, first = self._clean.data, self._clean.base
        base = max(self._segment_start, end - int(cfg.command.window_s * SAMPLE_RATE), first)
        if end - base < cfg.min_window_ms * self._ms:
            base = max(first, end - cfg.min_window_ms * self._ms)
        window = kept[base - first : end - first].copy()  # the kept audio is overwritten in place
        windows = [window]
        if end - self._segment_start < cfg.foreground_min_ms * self._ms:
            return windows
        fg = foreground(window, cfg)
        if fg is not None:
            windows.append(fg)
        return windows

    def _decode(self, end: int, trigger: str) -> bool:
        """Decode the current windows; a confident match becomes the pending command."""
        cfg = self.config
        if self._speech_run < cfg.min_window_ms * self._ms // 4:
            return False
        windows = self._windows(end)
        self._last_decode = end
        self.decodes += 1
        scored = self.detector.score_windows(windows, urgent=trigger != "hop")
        transcript, found, confidence = max(scored, key=lambda r: r[2])
        if self.trace is not None:
            self.trace.append((end, " | ".join(t.text for t, _, _ in scored), round(confidence, 3), trigger))
        promising = found is not None or any(self.detector.matcher.partial([w.text for w in t.words])
                                             for t, _, _ in scored)
        near = found is not None and confidence >= cfg.repeat_threshold
        self._repeats = self._repeats + 1 if near else 0
        hit = found is not None and (confidence >= cfg.command.threshold
                                     or 0 < cfg.repeat_count <= self._repeats)
        if self._pending is not None and end - self._pending[3] >= cfg.confirm_decode_ms * self._ms:
            # A later window (with new audio after the phrase) decides: still ending with the
            # phrase (however confidently) confirms it; anything else means the user said
            # more ("stop on my way").
            if found is not None:
                phrase, best, text = self._pending[:3]
                if confidence > best:
                    phrase, best, text = found.phrase, confidence, transcript.text
                self._pending = (phrase, best, text, self._pending[3], True)
            else:
                # Either the user said more, or this window misread the phrase (cut at the
                # last word's fading end, whisper read "Stop, I'm living" between two
                # "Stop Omni." 0.96 and 0.71): the pause's own decodes, with silence after
                # the words, tell which.
                self._pending = None
                promising = True
        elif hit and (self._pending is None or confidence > self._pending[1]):
            at = end if self._pending is None else self._pending[3]
            self._pending = (found.phrase, confidence, transcript.text, at, False)
        self._promising = promising
        return True

    def _interrupt(self, reason, phrase, confidence, at, text) -> Heard:
        self._interrupted = True
        audible, played = self.audible(at), self.played_ms(at)
        self.speaking = False
        # The server cancels the turn and the client flushes its player at this point.
        self.echo.flush_reference(at)
        return Heard("interrupt", int(at), reason, phrase, float(confidence), text, played, audible)
